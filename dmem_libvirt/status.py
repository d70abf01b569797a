"""Operating views: pools and reservations (`status`), cleanup (`reconcile`), installation (`check`).

`status` reads without the lock (the ledger is only ever replaced atomically).  `reconcile` takes the
lock and frees what no live guest owns, older than the grace period.  `check` returns findings, each
with the fix an operator should apply.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import counters, install, procmaps
from .backends import Finding
from .errors import DmemError
from .ledger import Reservation
from .lifecycle import HookContext, collect_orphans, find_orphans, rebuild_from_running
from .nova import running_instances
from .units import format_page_size, format_size


def collect(ctx: HookContext) -> dict[str, Any]:
    """The machine-readable status (`status --json`)."""
    default = ctx.backend.page_size()
    # A read-only view answers over a damaged ledger (the next hook call or reconcile repairs it).
    reservations, damage = ctx.ledger.snapshot()
    held: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: {"reserved": 0, "pinned": 0})
    for entry in reservations:
        held[entry.page_size, entry.node][entry.state] += entry.bytes
    # The default page size's pools always; another size's when it has pages or a guest holds some.
    pools = {(default, node): pool for node, pool in ctx.backend.pools().items()}
    for size in ctx.backend.page_sizes():
        if size != default:
            pools.update({(size, node): pool for node, pool in ctx.backend.pools(size).items()
                          if pool.total or (size, node) in held})
    domains: dict[str, dict[str, Any]] = {}
    nova = running_instances(ctx.run_dir) if reservations else {}
    for entry in reservations:
        instance = nova.get(entry.uuid)
        dom = domains.setdefault(entry.uuid, {"name": entry.domain, "uuid": entry.uuid, "bytes": 0,
                                              "nodes": [], "state": entry.state, "pid": entry.pid,
                                              "nova": instance and {"name": instance.name,
                                                                    "flavor": instance.flavor}})
        dom["bytes"] += entry.bytes
        if entry.node not in dom["nodes"]:
            dom["nodes"].append(entry.node)
        if entry.state == "reserved":
            dom["state"] = "reserved"
    saved = ctx.backend.savings()
    return {
        "backend": ctx.backend.name,
        "label": ctx.backend.label,
        "emulated": ctx.config.backend_name == "emulated",
        "mount": str(ctx.backend.mount),
        "page_size": default,
        "pools": [
            {"node": node, "page_size": size, "total": pool.total, "free": pool.free,
             "reserved": held[size, node]["reserved"], "pinned": held[size, node]["pinned"]}
            for (size, node), pool in sorted(pools.items(), key=lambda item: (item[0][0] != default, item[0]))
        ],
        "reservations": [
            {"domain": e.domain, "uuid": e.uuid, "node": e.node, "bytes": e.bytes, "state": e.state,
             "file": e.file, "path": e.path, "origin": e.origin, "pid": e.pid, "page_size": e.page_size,
             "created": e.created}
            for e in sorted(reservations, key=lambda e: (e.domain, e.file))
        ],
        "domains": sorted(domains.values(), key=lambda d: d["name"]),
        # Pages the tool added to the kernel's pools and has not given back (hugetlbfs).
        "grown": [{"node": node, "page_size": size, "pages": pages}
                  for (node, size), pages in sorted(ctx.ledger.read_grown().items())],
        "struct_page_saved": saved.bytes,
        "struct_page_saved_measured": saved.measured,
        "struct_page_saved_how": saved.how,
        "ledger_damage": damage,
        "counters": counters.read(ctx.config.state.dir, ctx.ledger.boot_id),
    }


def damage_warning(status: dict[str, Any]) -> str | None:
    """The line `status` prints on stderr when the ledger it showed is damaged."""
    if not status["ledger_damage"]:
        return None
    return (f"dmem-libvirt: warning: showing what a damaged ledger still says: {status['ledger_damage']}; "
            "the next hook call or 'dmem-libvirt reconcile' repairs it")


def render(status: dict[str, Any]) -> str:
    """The table `status` prints."""
    page = format_page_size(status["page_size"])
    lines = [f"{status['label']} on {status['mount']}, {page} pages", ""]
    # A page column only when pools of more than one page size are shown.
    several = len({pool["page_size"] for pool in status["pools"]}) > 1

    def page_column(text: str) -> str:
        return f"{text:<6} " if several else ""

    lines.append(f"{'NODE':>4}  {page_column('PAGE')}{'TOTAL':>11}  {'FREE':>11}  {'RESERVED':>11}  {'PINNED':>11}")
    for pool in status["pools"]:
        lines.append(f"{pool['node']:>4}  {page_column(format_page_size(pool['page_size']))}"
                     f"{format_size(pool['total']):>11}  {format_size(pool['free']):>11}  "
                     f"{format_size(pool['reserved']):>11}  {format_size(pool['pinned']):>11}")
    lines.append("")
    if status["domains"]:
        nova = any(dom["nova"] for dom in status["domains"])
        lines.append(f"{'DOMAIN':<24} {'NODES':<8} {'SIZE':>11}  {'STATE':<9} {'PID':<8}"
                     + ("NOVA INSTANCE (FLAVOR)" if nova else "").rstrip())
        for dom in status["domains"]:
            nodes = ",".join(str(n) for n in dom["nodes"])
            line = (f"{dom['name']:<24} {nodes:<8} {format_size(dom['bytes']):>11}  "
                    f"{dom['state']:<9} {dom['pid'] or '-'!s:<8}")
            if dom["nova"]:
                line += f"{dom['nova']['name']} ({dom['nova']['flavor']})"
            lines.append(line.rstrip())
    else:
        lines.append("no domain holds reserved memory")
    lines.append("")
    for grown in status["grown"]:
        lines.append(f"node {grown['node']}: {grown['pages']} pages of {format_page_size(grown['page_size'])} "
                     "added to the pool by dmem-libvirt")
    counts = status["counters"]
    refused = {reason: n for reason, n in counts["refusals"].items() if n}
    lines.append(f"since boot: {sum(counts['admissions'].values())} admitted, {sum(refused.values())} refused"
                 + (f" ({', '.join(f'{reason} {n}' for reason, n in refused.items())})" if refused else "")
                 + f", {sum(counts['hook_failures'].values())} hook failures")
    how = "measured" if status["struct_page_saved_measured"] else "computed"
    lines.append(f"struct page memory saved: {format_size(status['struct_page_saved'])} "
                 f"({how}: {status['struct_page_saved_how']})")
    return "\n".join(lines)


def reconcile(ctx: HookContext, *, dry_run: bool = False) -> list[str]:
    """Adopt running guests the ledger lost, free what no live guest owns; what was (or would be) done."""
    if dry_run:
        held = ctx.ledger.read()
        known = {entry.uuid for entry in held}
        return [*(f"would adopt {_adopted(entry)}: it runs with dmem-libvirt metadata but the ledger lacks it"
                  for entry in rebuild_from_running(ctx) if entry.uuid not in known),
                *(f"would free {orphan.what}: {orphan.why}" for orphan in find_orphans(ctx, held))]
    done: list[str] = []
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        known = {entry.uuid for entry in book.reservations}
        adopted = list(book.recovered)
        for entry in rebuild_from_running(ctx):
            if entry.uuid not in known:
                book.add(entry)
                adopted.append(entry)
        done.extend(f"adopted {_adopted(entry)}" for entry in adopted)
        done.extend(f"freed {what}" for what in collect_orphans(ctx, book))
        before = dict(book.grown)
        # Pages a backend added to the kernel's pools that were still in use at their guest's release.
        ctx.backend.give_back(ctx, book, [])
        done.extend(f"gave back {pages - book.grown.get(key, 0)} pages of {format_page_size(key[1])} on node "
                    f"{key[0]}" for key, pages in sorted(before.items()) if pages != book.grown.get(key, 0))
    return done


def _adopted(entry: Reservation) -> str:
    return f"{entry.domain}: {format_size(entry.bytes)} on node {entry.node} ({entry.file})"


def check(ctx: HookContext) -> list[Finding]:
    """Every condition a working installation needs, each with its fix."""
    return [*_check_hook(ctx), *ctx.backend.check(ctx), *_check_confinement(ctx), *_check_state(ctx)]


def _check_state(ctx: HookContext) -> list[Finding]:
    from .ledger import state_dir_problem

    directory = ctx.config.state.dir
    problem = state_dir_problem(directory)
    findings = [Finding(False, problem, "the hook refuses every guest of ours until this is fixed") if problem
                else Finding(True, f"state directory {directory} belongs to root alone")]
    _, damage = ctx.ledger.snapshot()
    if damage:
        findings.append(Finding(False, damage, "dmem-libvirt reconcile"))
    aside = sorted(directory.glob("ledger.json.corrupt-*"))
    if aside:
        findings.append(Finding(False, f"{len(aside)} damaged ledger(s) were set aside, the last {aside[-1]}; "
                                       "reservations they held that no running guest explained were dropped",
                                f"compare with 'dmem-libvirt status', then remove {directory}/ledger.json.corrupt-*"))
    return findings


def _daemon(ctx: HookContext) -> str:
    return install.daemon_name(ctx.run_dir)


def _check_hook(ctx: HookContext) -> list[Finding]:
    path = install.hook_path(ctx.config.libvirt.hooks_dir)
    fix = "dmem-libvirt install-hook"
    if not path.exists():
        return [Finding(False, f"hook {path} is missing", fix)]
    if not install.is_ours(path):
        return [Finding(False, f"{path} was not written by dmem-libvirt", f"move it away, then {fix}")]
    if not os.access(path, os.X_OK):
        return [Finding(False, f"hook {path} is not executable", f"chmod 755 {path}")]
    findings = [Finding(True, f"hook {path} installed")]
    interpreter = install.hook_interpreter(path.read_text())
    if not os.access(interpreter, os.X_OK):
        findings.append(Finding(False, f"the hook's interpreter {interpreter or '(none)'} is not executable",
                                fix))
    else:
        findings.append(_check_hook_imports(path))
    daemon = install.find_daemon(ctx.run_dir, ctx.proc)
    if not isinstance(daemon, install.Daemon):
        findings.append(Finding(False, f"no running libvirtd or virtqemud has loaded the hook: {daemon}",
                                f"systemctl reload-or-restart {_daemon(ctx)}"))
        return findings
    seen_since = max(_process_start(ctx, daemon.pid), _reload_time(ctx, daemon.pid))
    if seen_since >= path.stat().st_mtime:
        findings.append(Finding(True, f"{daemon.name} (pid {daemon.pid}) has seen the hook"))
    else:
        # libvirt looks for hook scripts only when the daemon starts or gets SIGHUP.
        findings.append(Finding(False, f"{daemon.name} (pid {daemon.pid}) has not seen the hook: it started "
                                       "before the hook was written and was not reloaded since",
                                f"kill -HUP {daemon.pid} (or systemctl reload {daemon.name})"))
    return findings


# A guest that is not ours (no <dmem:memory>) but names our namespace, so the hook script must import the
# package to find that out; it then exits 0 without touching the host.
_IMPORT_PROBE = (b"<domain type='kvm'><name>dmem-libvirt-check</name><metadata>"
                 b"<probe xmlns='http://dmem-libvirt.org/xmlns/domain/1'/></metadata></domain>")


def _check_hook_imports(path: Path) -> Finding:
    """Run the installed hook as libvirt would (cwd /, a bare environment) and see that it loads the package."""
    import subprocess

    try:
        done = subprocess.run([str(path), "dmem-libvirt-check", "prepare", "begin", "-"], input=_IMPORT_PROBE,
                              capture_output=True, cwd="/", timeout=30, check=False,
                              env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
    except (OSError, subprocess.TimeoutExpired) as err:
        return Finding(False, f"the hook {path} cannot be run: {err}", "dmem-libvirt install-hook")
    if done.returncode:
        said = " ".join(done.stderr.decode(errors="replace").split())[:300]
        return Finding(False, f"the hook {path} fails as libvirt runs it (exit {done.returncode}): {said}",
                       "dmem-libvirt install-hook (every guest of ours is refused until then)")
    return Finding(True, f"hook {path} loads the package as libvirt runs it")


def _process_start(ctx: HookContext, pid: int) -> float:
    """When ``pid`` started, in seconds since the epoch (0 when it cannot be told)."""
    try:
        ticks = procmaps.start_ticks(ctx.proc, pid)
        btime = next(int(line.split()[1]) for line in (ctx.proc / "stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (DmemError, OSError, StopIteration, IndexError, ValueError):
        return 0.0
    return btime + ticks / os.sysconf("SC_CLK_TCK") if ticks is not None else 0.0


def _reload_time(ctx: HookContext, pid: int) -> float:
    """When install-hook last reloaded this very daemon (0 when it did not)."""
    try:
        stamp_pid, stamp = (ctx.config.state.dir / install.RELOAD_STAMP).read_text().split()
        return float(stamp) if stamp_pid == str(pid) else 0.0
    except (OSError, ValueError):
        return 0.0


def _check_confinement(ctx: HookContext) -> list[Finding]:
    sysfs = ctx.config.host.sysfs
    mount = ctx.backend.mount
    qemu_conf = ctx.config.libvirt.qemu_conf
    try:
        conf = qemu_conf.read_text()
    except OSError:
        conf = ""
    driver_none = any(line.split("#", 1)[0].replace(" ", "") == 'security_driver="none"'
                      for line in conf.splitlines())
    findings = []
    if (sysfs / "kernel" / "security" / "apparmor").exists() and not driver_none:
        findings.append(Finding(False, f"AppArmor confines QEMU; its profile must allow {mount}",
                                f"add '{mount}/** rwk,' to /etc/apparmor.d/local/abstractions/libvirt-qemu "
                                "and reload apparmor"))
    try:
        enforcing = (sysfs / "fs" / "selinux" / "enforce").read_text().strip() == "1"
    except OSError:
        enforcing = False
    if enforcing and not driver_none:
        findings.append(Finding(False, f"SELinux is enforcing; QEMU needs a label on {mount}",
                                f"semanage fcontext -a -t svirt_image_t '{mount}(/.*)?' && restorecon -R {mount}"))
    if not findings:
        findings.append(Finding(True, "no AppArmor/SELinux confinement in the way"
                                      + (" (security_driver = \"none\")" if driver_none else "")))
    return findings

