"""Operating views: pools and reservations (`status`), cleanup (`reconcile`), installation (`check`).

`status` reads without the lock (the ledger is only ever replaced atomically).  `reconcile` takes the
lock and frees what no live guest owns, older than the grace period.  `check` returns findings, each
with the fix an operator should apply.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from . import install
from .errors import DmemError
from .lifecycle import HookContext, backing_dir_on_backend, collect_orphans, rebuild_from_running
from .units import format_page_size, format_size

# A 64-byte struct page for every 4 KiB page: what reserved memory without struct page saves.
STRUCT_PAGE_BYTES = 64
BASE_PAGE = 4096


def collect(ctx: HookContext) -> dict[str, Any]:
    """The machine-readable status (`status --json`)."""
    pools = ctx.backend.pools()
    reservations = ctx.ledger.read()
    held: dict[int, dict[str, int]] = defaultdict(lambda: {"reserved": 0, "pinned": 0})
    for entry in reservations:
        held[entry.node][entry.state] += entry.bytes
    domains: dict[str, dict[str, Any]] = {}
    for entry in reservations:
        dom = domains.setdefault(entry.uuid, {"name": entry.domain, "uuid": entry.uuid, "bytes": 0,
                                              "nodes": [], "state": entry.state, "pid": entry.pid})
        dom["bytes"] += entry.bytes
        if entry.node not in dom["nodes"]:
            dom["nodes"].append(entry.node)
        if entry.state == "reserved":
            dom["state"] = "reserved"
    total = sum(pool.total for pool in pools.values())
    return {
        "backend": ctx.backend.name,
        "emulated": ctx.config.dmemfs.emulate,
        "mount": str(ctx.backend.mount),
        "page_size": ctx.backend.page_size(),
        "pools": [
            {"node": node, "total": pool.total, "free": pool.free,
             "reserved": held[node]["reserved"], "pinned": held[node]["pinned"]}
            for node, pool in sorted(pools.items())
        ],
        "reservations": [
            {"domain": e.domain, "uuid": e.uuid, "node": e.node, "bytes": e.bytes, "state": e.state,
             "file": e.file, "path": e.path, "origin": e.origin, "pid": e.pid, "page_size": e.page_size,
             "created": e.created}
            for e in sorted(reservations, key=lambda e: (e.domain, e.file))
        ],
        "domains": sorted(domains.values(), key=lambda d: d["name"]),
        "struct_page_saved": total // BASE_PAGE * STRUCT_PAGE_BYTES,
    }


def render(status: dict[str, Any]) -> str:
    """The table `status` prints."""
    page = format_page_size(status["page_size"])
    kind = " (emulated)" if status["emulated"] else ""
    lines = [f"{status['backend']}{kind} on {status['mount']}, {page} pages", ""]
    lines.append(f"{'NODE':>4}  {'TOTAL':>11}  {'FREE':>11}  {'RESERVED':>11}  {'PINNED':>11}")
    for pool in status["pools"]:
        lines.append(f"{pool['node']:>4}  {format_size(pool['total']):>11}  {format_size(pool['free']):>11}  "
                     f"{format_size(pool['reserved']):>11}  {format_size(pool['pinned']):>11}")
    lines.append("")
    if status["domains"]:
        lines.append(f"{'DOMAIN':<24} {'NODES':<8} {'SIZE':>11}  {'STATE':<9} PID")
        for dom in status["domains"]:
            nodes = ",".join(str(n) for n in dom["nodes"])
            lines.append(f"{dom['name']:<24} {nodes:<8} {format_size(dom['bytes']):>11}  "
                         f"{dom['state']:<9} {dom['pid'] or '-'}")
    else:
        lines.append("no domain holds reserved memory")
    lines.append("")
    lines.append(f"struct page memory saved: {format_size(status['struct_page_saved'])} "
                 f"({STRUCT_PAGE_BYTES} B per {BASE_PAGE // 1024} KiB page of the pools)")
    return "\n".join(lines)


def reconcile(ctx: HookContext) -> list[str]:
    """Adopt running guests the ledger lost, free what no live guest owns; what was done, one per line."""
    done: list[str] = []
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        known = {entry.uuid for entry in book.reservations}
        for entry in rebuild_from_running(ctx):
            if entry.uuid not in known:
                book.add(entry)
                done.append(f"adopted {entry.domain}: {format_size(entry.bytes)} on node {entry.node} ({entry.file})")
        done.extend(f"freed {what}" for what in collect_orphans(ctx, book))
    return done


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""


def check(ctx: HookContext) -> list[Finding]:
    """Every condition a working installation needs, each with its fix."""
    findings: list[Finding] = []
    hooks_dir = ctx.config.libvirt.hooks_dir
    findings.extend(_check_hook(ctx, hooks_dir))
    mount = ctx.backend.mount
    from .host import fs_magic

    try:
        magic = fs_magic(mount)
        ok = magic == ctx.backend.fs_magic
        findings.append(Finding(ok, f"{mount} is {'' if ok else 'not '}a {ctx.backend.fs_name} mount"
                                    + ("" if ok else f" (filesystem magic {magic:#x})"),
                                "mount -t dmemfs none -o pagesize=2M " + str(mount)
                                + " (see examples/dev-dmem.mount)"))
    except OSError as err:
        findings.append(Finding(False, f"{mount} cannot be examined: {err.strerror}",
                                f"mkdir -p {mount} && mount -t dmemfs none -o pagesize=2M {mount}"))
    try:
        findings.append(Finding(backing_dir_on_backend(ctx),
                                f"libvirt memory_backing_dir {ctx.host.memory_backing_dir()} is "
                                f"{'' if backing_dir_on_backend(ctx) else 'not '}on {mount}",
                                f'set memory_backing_dir = "{mount}" in {ctx.config.libvirt.qemu_conf} '
                                "and restart libvirtd"))
    except DmemError as err:
        findings.append(Finding(False, err.message, f"fix {ctx.config.libvirt.qemu_conf}"))
    debugfs_ok = ctx.host.debugfs_available()
    capacity = bool(ctx.config.dmemfs.capacity)
    findings.append(Finding(debugfs_ok or capacity,
                            f"dmem statistics in {ctx.config.dmemfs.debugfs} "
                            + ("readable" if debugfs_ok else "unreadable")
                            + ("" if debugfs_ok or not capacity else "; using [dmemfs.capacity]"),
                            "mount -t debugfs none /sys/kernel/debug, or declare [dmemfs.capacity] "
                            "per node in the config"))
    try:
        findings.append(Finding(True, f"page size {format_page_size(ctx.backend.page_size())}"))
    except DmemError as err:
        findings.append(Finding(False, err.message, "make [dmemfs] page_size match the mount's pagesize="))
    findings.extend(_check_confinement(ctx))
    return findings


def _check_hook(ctx: HookContext, hooks_dir: os.PathLike[str]) -> list[Finding]:
    from pathlib import Path

    path = install.hook_path(Path(hooks_dir))
    fix = "dmem-libvirt install-hook"
    if not path.exists():
        return [Finding(False, f"hook {path} is missing", fix)]
    if not install.is_ours(path):
        return [Finding(False, f"{path} was not written by dmem-libvirt", f"move it away, then {fix}")]
    if not os.access(path, os.X_OK):
        return [Finding(False, f"hook {path} is not executable", f"chmod 755 {path}")]
    findings = [Finding(True, f"hook {path} installed")]
    interpreter = path.read_text().splitlines()[0][2:].split()[0]
    if not os.access(interpreter, os.X_OK):
        findings.append(Finding(False, f"the hook's interpreter {interpreter} is gone", fix))
    daemon = install.running_daemon(ctx.run_dir, ctx.proc)
    if daemon is None:
        findings.append(Finding(False, "no running libvirtd/virtqemud owns " + str(ctx.run_dir),
                                "systemctl start libvirtd (or virtqemud)"))
        return findings
    seen_since = max(_process_start(ctx, daemon.pid), _reload_time(ctx, daemon.pid))
    ok = seen_since >= path.stat().st_mtime
    findings.append(Finding(ok, f"{daemon.name} (pid {daemon.pid}) "
                                + ("has seen the hook" if ok else "started before the hook was installed"),
                            f"systemctl reload {daemon.name} (or kill -HUP {daemon.pid})"))
    return findings


def _process_start(ctx: HookContext, pid: int) -> float:
    try:
        fields = (ctx.proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in (ctx.proc / "stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _reload_time(ctx: HookContext, pid: int) -> float:
    try:
        stamp_pid, stamp = (ctx.config.state.dir / install.RELOAD_STAMP).read_text().split()
    except (OSError, ValueError):
        return 0.0
    return float(stamp) if stamp_pid == str(pid) else 0.0


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


def age(seconds_since: float) -> str:
    return f"{time.time() - seconds_since:.0f} s"
