"""Hook cost: wall time of one libvirt hook call against a bare start of the same interpreter, same run.

Run as root: ``.venv/bin/python bench/hook.py [--reps 30] [--guests 50]``.  The baseline is the hook's own
interpreter (this venv's, as `install-hook` writes it into the script's PYTHON line) running ``-I -c pass``; every case
runs interleaved with it, one call of each in turn, and is reported as its median and ratio to the baseline's:
(a) the installed hook script, ``NAME prepare begin -``, for a guest without file-backed RAM (goal <= 1.5x);
(b) ``prepare begin`` of a dmem guest on a fake host (tests/fakehost.py) running 50 guests whose ledger
    holds their 100 reservations (goal <= 3x), through ``python -IS -c`` driving ``hook.main`` with that
    host's config, and through the installed script with the config bind-mounted over /etc/dmem-libvirt
    in a private mount namespace (the host's /etc is never written).
Two rows split (b) into interpreter start, imports and the call; then ``-X importtime`` of (b) (case (a)
starts no interpreter: the script's /bin/sh half lets the guest pass): the costliest modules and the self
time per top-level package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from dmem_libvirt import config as config_module
from dmem_libvirt import install
from dmem_libvirt.define import plan
from dmem_libvirt.host import Host
from dmem_libvirt.ledger import Ledger, Reservation
from dmem_libvirt.units import GiB, MiB

PYTHON = sys.executable
PAGE = 2 * MiB
CELL = 1 * GiB                 # each running guest: two cells of this size, one per host node
GUEST_CELL = 2 * GiB           # the guest being admitted
DMEM_PER_NODE = 64 * GiB
HOOK_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
# What a `python -IS -c` driver needs to do what the installed hook does, with the config given in argv[1].
DRIVER = """\
import sys
sys.path[:0] = {paths!r}
from dmem_libvirt import config, hook, lifecycle
context = lifecycle.HookContext.create(config.load(sys.argv[1]))
sys.exit(hook.main(["hook"] + sys.argv[2:], sys.stdin.buffer, sys.stdout, sys.stderr, context=context))
"""
DRIVER_IMPORTS = """\
import sys
sys.path[:0] = {paths!r}
from dmem_libvirt import config, hook, lifecycle
"""
# libvirt 9.0 lists every capability it probed in each running guest's status file, a few hundred of them.
QEMU_CAPS = tuple(f"{word}-{index}" for index, word in enumerate(
    ("kvm", "blockdev", "virtio-net", "machine", "query-cpu", "object", "chardev", "netdev") * 45))
NAMESPACE_FLAG = "--installed-dmem-in-namespace"
SCENARIO_FILE = "scenario.json"     # what the namespace run needs, written next to the fake host


def guest_xml(name: str, guest_uuid: str, cell: int, *, dom_id: int | None = None) -> str:
    """A two-cell KVM guest with anonymous RAM, as a user would define it."""
    kib = cell // 1024
    id_attr = f' id="{dom_id}"' if dom_id is not None else ""
    return f"""<domain type="kvm"{id_attr}>
  <name>{name}</name>
  <uuid>{guest_uuid}</uuid>
  <memory unit="KiB">{2 * kib}</memory>
  <currentMemory unit="KiB">{2 * kib}</currentMemory>
  <vcpu placement="static">4</vcpu>
  <os>
    <type arch="x86_64" machine="pc-q35-7.2">hvm</type>
    <boot dev="hd"/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode="custom" match="exact" check="none">
    <model fallback="forbid">qemu64</model>
    <numa>
      <cell id="0" cpus="0-1" memory="{kib}" unit="KiB"/>
      <cell id="1" cpus="2-3" memory="{kib}" unit="KiB"/>
    </numa>
  </cpu>
  <clock offset="utc"/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"/>
      <source file="/var/lib/libvirt/images/{name}.qcow2"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <interface type="network">
      <source network="default"/>
      <model type="virtio"/>
    </interface>
    <console type="pty"/>
    <memballoon model="virtio"/>
  </devices>
</domain>
"""


def dmem_xml(name: str, guest_uuid: str, cell: int, *, dom_id: int | None = None) -> bytes:
    """The same guest after the define-time rewrite: cell 0 on host node 0, cell 1 on node 1."""
    return plan(guest_xml(name, guest_uuid, cell, dom_id=dom_id), page_size=PAGE, rooms=None,
                nodes=[0, 1]).rewritten


def status_file(name: str, dom_id: int, pid: int, live_xml: bytes) -> bytes:
    """``<run_dir>/<name>.xml`` shaped like libvirt's: process state, QEMU capability flags, the live domain."""
    short = f"{dom_id}-{name}"
    flags = "".join(f"    <flag name='{flag}'/>\n" for flag in QEMU_CAPS)
    vcpus = "".join(f"    <vcpu id='{vcpu}' pid='{pid + 1 + vcpu}'/>\n" for vcpu in range(4))
    head = f"""<domstatus state='running' reason='booted' pid='{pid}'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-{short}/monitor.sock' type='unix'/>
  <namespaces>
    <mount/>
  </namespaces>
  <vcpus>
{vcpus}  </vcpus>
  <qemuCaps>
{flags}  </qemuCaps>
  <devices>
    <device alias='virtio-disk0'/>
    <device alias='net0'/>
    <device alias='balloon0'/>
    <device alias='serial0'/>
  </devices>
  <libDir path='/var/lib/libvirt/qemu/domain-{short}'/>
  <channelTargetDir path='/var/lib/libvirt/qemu/channel/target/domain-{short}'/>
  <chardevStdioLogd/>
  <allowReboot value='yes'/>
  <nodename index='2'/>
  <fdset index='0'/>
  <blockjobs active='no'/>
  <agentTimeout>-2</agentTimeout>
"""
    return head.encode() + live_xml + b"</domstatus>\n"


def _uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.bench.dmem-libvirt"))


def load_fakehost() -> ModuleType:
    """tests/fakehost.py, the fake sysfs/debugfs/libvirt tree the unit tests use."""
    path = Path(__file__).resolve().parent.parent / "tests" / "fakehost.py"
    spec = importlib.util.spec_from_file_location("fakehost", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is processed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Scenario:
    root: Path
    config_path: Path
    ledger_path: Path
    ledger_bytes: bytes            # the ledger before the guest's prepare; restored before every call
    plain_xml: bytes
    dmem_xml: bytes
    status_bytes: int              # size of one running guest's status file


def build_host(root: Path, guests: int) -> Scenario:
    """A two-node fake host running ``guests`` dmem guests (two reservations each), as libvirt shows them."""
    fakehost = load_fakehost()
    used = guests * CELL
    nodes = {n: fakehost.FakeNode(cpus=[2 * n, 2 * n + 1], mem_total=96 * GiB, dmem_total=DMEM_PER_NODE,
                                  dmem_free=DMEM_PER_NODE - used) for n in (0, 1)}
    config: config_module.Config = fakehost.make_host(root, nodes)
    host = Host(config)
    backing = host.memory_backing_dir() / "libvirt" / "qemu"
    run_dir = config.libvirt.run_dir
    created = time.time() - 3600   # older than the orphan grace period: liveness is checked, as on a real host
    entries: list[Reservation] = []
    status_bytes = 0
    for index in range(guests):
        name, dom_id, pid = f"guest{index:03d}", index + 1, 100_000 + index
        guest_uuid = _uuid(name)
        status = status_file(name, dom_id, pid, dmem_xml(name, guest_uuid, CELL, dom_id=dom_id))
        (run_dir / f"{name}.xml").write_bytes(status)
        (run_dir / f"{name}.pid").write_text(f"{pid}\n")
        status_bytes = len(status)
        proc_dir = config.host.proc / str(pid)
        proc_dir.mkdir(parents=True)
        (proc_dir / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194624 0 0 0 0\n")
        directory = backing / f"{dom_id}-{name}"
        directory.mkdir(parents=True)
        for node in (0, 1):
            file = directory / f"ram-node{node}"
            file.touch()
            entries.append(Reservation(
                domain=name, uuid=guest_uuid, node=node, bytes=CELL, page_size=PAGE, backend="dmemfs",
                file=file.name, state="pinned", origin="prepare", created=created, path=str(file),
                inode=file.stat().st_ino, pid=pid))
    ledger = Ledger(config.state.dir, host.boot_id(), lock_timeout=config.state.lock_timeout)
    with ledger.transaction() as book:
        for entry in entries:
            book.add(entry)
    assert config.source is not None
    return Scenario(root=root, config_path=config.source, ledger_path=ledger.path,
                    ledger_bytes=ledger.path.read_bytes(),
                    plain_xml=guest_xml("bench-plain", _uuid("bench-plain"), GUEST_CELL).encode(),
                    dmem_xml=dmem_xml("bench-dmem", _uuid("bench-dmem"), GUEST_CELL),
                    status_bytes=status_bytes)


def install_script(directory: Path) -> Path:
    """The hook exactly as `install-hook` writes it (interpreter and library paths baked in)."""
    path = directory / install.HOOK_NAME
    path.write_text(install.render_hook(install.hook_template(), PYTHON, install.library_paths()))
    path.chmod(0o755)
    return path


# ---- running and timing --------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    argv: list[str]
    stdin: bytes = b""
    before: Callable[[], None] | None = None     # untimed: put the host back as it was
    goal: float | None = None
    samples: list[float] = field(default_factory=list)

    def run(self, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
        if self.before is not None:
            self.before()
        # The interpreter's own flags go first: argv[0] must be the interpreter itself.
        argv = [PYTHON, *extra, *self.argv[1:]] if extra else self.argv
        return subprocess.run(argv, input=self.stdin, capture_output=True, env=HOOK_ENV, cwd="/", check=False)

    def timed(self) -> None:
        if self.before is not None:
            self.before()
        start = time.perf_counter()
        done = subprocess.run(self.argv, input=self.stdin, capture_output=True, env=HOOK_ENV, cwd="/",
                              check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0 or done.stderr:
            raise SystemExit(f"{self.label}: exit {done.returncode}: {done.stderr.decode(errors='replace')}")
        self.samples.append(elapsed * 1000)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure(cases: Sequence[Case], reps: int, warmup: int = 3) -> None:
    """Interleaved: one call of each case in turn, so drift from other load hits every case alike."""
    for _ in range(warmup):
        for case in cases:
            case.timed()
    for case in cases:
        case.samples.clear()
    for _ in range(reps):
        for case in cases:
            case.timed()


def restore_ledger(scenario: Scenario) -> Callable[[], None]:
    def restore() -> None:
        scenario.ledger_path.write_bytes(scenario.ledger_bytes)
    return restore


def check_admitted(scenario: Scenario, expected: int) -> None:
    entries = json.loads(scenario.ledger_path.read_text())["reservations"]
    if len(entries) != expected:
        raise SystemExit(f"prepare left {len(entries)} reservations, expected {expected}")


# ---- -X importtime ------------------------------------------------------------------------------


ImportRow = tuple[str, float, float]    # module, self ms, cumulative ms


def import_times(case: Case, runs: int = 5) -> list[ImportRow]:
    """Every module the case imports, with medians over ``runs``, most expensive self time first."""
    per_module: dict[str, list[tuple[float, float]]] = {}
    for _ in range(runs):
        done = case.run(extra=("-X", "importtime"))
        if done.returncode != 0:
            raise SystemExit(f"{case.label} under -X importtime: exit {done.returncode}: {done.stderr.decode()}")
        for line in done.stderr.decode().splitlines():
            if not line.startswith("import time:") or "imported package" in line:
                continue
            self_us, cumulative_us, module = line[len("import time:"):].split("|", 2)
            per_module.setdefault(module.strip(), []).append((int(self_us) / 1000, int(cumulative_us) / 1000))
    rows = [(module, statistics.median(s for s, _ in times), statistics.median(c for _, c in times))
            for module, times in per_module.items()]
    return sorted(rows, key=lambda row: row[1], reverse=True)


def by_package(rows: list[ImportRow]) -> list[tuple[str, float, int]]:
    """Self time summed per top-level package (dmem_libvirt, tomllib, json, ...): what each dependency costs."""
    totals: dict[str, tuple[float, int]] = {}
    for module, self_ms, _ in rows:
        package = module.split(".", 1)[0]
        spent, count = totals.get(package, (0.0, 0))
        totals[package] = (spent + self_ms, count + 1)
    return sorted(((package, spent, count) for package, (spent, count) in totals.items()),
                  key=lambda row: row[1], reverse=True)


def print_import_times(title: str, rows: list[ImportRow], top: int) -> None:
    print(f"\n-X importtime, {title}: {len(rows)} modules, {sum(r[1] for r in rows):.1f} ms of imports in all")
    packages = by_package(rows)
    print(f"{'self ms':>8} {'cumul ms':>9}  module{'':<34}{'self ms':>8}  top-level package (modules)")
    for index in range(min(top, max(len(rows), len(packages)))):
        left = (f"{rows[index][1]:8.2f} {rows[index][2]:9.2f}  {rows[index][0]:<40}" if index < len(rows)
                else " " * 61)
        right = (f"{packages[index][1]:8.2f}  {packages[index][0]} ({packages[index][2]})"
                 if index < len(packages) else "")
        print(f"{left}{right}".rstrip())


# ---- the installed hook with a config at the default path -----------------------------------------


def installed_dmem(scenario: Scenario, script: Path, reps: int) -> dict[str, Any]:
    """Re-run this file in a private mount namespace, where the fake host's config is the default one."""
    if os.geteuid() != 0:
        return {"unavailable": "needs root (a private mount namespace)"}
    if not config_module.DEFAULT_PATH.parent.is_dir():
        return {"unavailable": f"{config_module.DEFAULT_PATH.parent} does not exist to mount over "
                               "(this benchmark does not create it)"}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON, __file__, NAMESPACE_FLAG,
                           str(scenario.root), str(script), str(reps)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return {"unavailable": lines[-1] if lines else f"unshare exited {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def namespace_main(root: Path, script: Path, reps: int) -> int:
    """Inside the private mount namespace: baseline and installed hook, interleaved; JSON on stdout.

    The fake host's config is bound over the default config directory; the bind mount exists only in
    this namespace, so the host's /etc/dmem-libvirt is neither written nor seen changed by anyone else.
    """
    saved = json.loads((root / SCENARIO_FILE).read_text())
    ledger_path, ledger_bytes = Path(saved["ledger_path"]), bytes.fromhex(saved["ledger_bytes"])
    target = config_module.DEFAULT_PATH.parent

    def restore() -> None:
        ledger_path.write_bytes(ledger_bytes)

    with tempfile.TemporaryDirectory(prefix="dmem-hook-bench-etc-", dir=root) as scratch:
        source = Path(scratch)
        (source / config_module.DEFAULT_PATH.name).write_bytes(Path(saved["config_path"]).read_bytes())
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        try:
            baseline = Case("baseline", [PYTHON, "-I", "-c", "pass"])
            hook = Case("installed", [str(script), "bench-dmem", "prepare", "begin", "-"],
                        stdin=bytes.fromhex(saved["dmem_xml"]), before=restore)
            measure([baseline, hook], reps)
            admitted = len(json.loads(ledger_path.read_text())["reservations"])
        finally:
            subprocess.run(["umount", str(target)], check=True)
    json.dump({"how": f"bind mount over {target}", "baseline": baseline.samples, "hook": hook.samples,
               "ledger_after": admitted}, sys.stdout)
    return 0


# ---- report -------------------------------------------------------------------------------------


def verdict(ratio: float, goal: float | None) -> str:
    if goal is None:
        return ""
    return f"<= {goal:.1f}x  {'PASS' if ratio <= goal else 'FAIL'}"


def row(label: str, median: float, base: float, goal: float | None = None) -> None:
    print(f"{label:<64} {median:9.2f} {median / base:6.2f}  {verdict(median / base, goal)}".rstrip())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == NAMESPACE_FLAG:
        return namespace_main(Path(args[1]), Path(args[2]), int(args[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=30, help="timed calls per case (median; at least 30)")
    parser.add_argument("--guests", type=int, default=50,
                        help="running dmem guests on the fake host, two reservations each")
    parser.add_argument("--top", type=int, default=12, help="rows of each -X importtime table")
    options = parser.parse_args(args)
    reps = max(30, options.reps)
    expected = 2 * options.guests + 2

    with tempfile.TemporaryDirectory(prefix="dmem-hook-bench-") as tmp:
        root = Path(tmp)
        scenario = build_host(root / "host", options.guests)
        script = install_script(root)
        (scenario.root / SCENARIO_FILE).write_text(json.dumps({
            "config_path": str(scenario.config_path), "ledger_path": str(scenario.ledger_path),
            "ledger_bytes": scenario.ledger_bytes.hex(), "dmem_xml": scenario.dmem_xml.hex()}))
        restore = restore_ledger(scenario)
        paths = install.library_paths()
        driver = DRIVER.format(paths=paths)
        dmem_args = [str(scenario.config_path), "bench-dmem", "prepare", "begin", "-"]

        baseline = Case("baseline", [PYTHON, "-I", "-c", "pass"])
        plain = Case("(a) installed hook, guest without file-backed RAM",
                     [str(script), "bench-plain", "prepare", "begin", "-"], stdin=scenario.plain_xml, goal=1.5)
        dmem = Case(f"(b) dmem guest, {expected - 2} reservations, python -IS -c driver",
                    [PYTHON, "-IS", "-c", driver, *dmem_args], stdin=scenario.dmem_xml, before=restore, goal=3.0)
        # Not goals: where (b)'s time goes.
        bare = Case("  of which: interpreter start, python -IS -c pass", [PYTHON, "-IS", "-c", "pass"])
        imports = Case("  of which: interpreter + the driver's imports, no call",
                       [PYTHON, "-IS", "-c", DRIVER_IMPORTS.format(paths=paths)])
        measure([baseline, plain, dmem, bare, imports], reps)
        check_admitted(scenario, expected)
        namespace = installed_dmem(scenario, script, reps)

        print(f"hook wall time, `NAME prepare begin -` with the domain XML on stdin, env {sorted(HOOK_ENV)}, cwd /")
        print(f"interpreter {PYTHON} (Python {sys.version.split()[0]}); {os.cpu_count()} CPUs; "
              f"median of {reps} interleaved calls after 3 warm-ups")
        print(f"fake host: 2 nodes x {DMEM_PER_NODE // GiB} GiB of 2 MiB dmem pages, {options.guests} running "
              f"guests (status files of {scenario.status_bytes / 1024:.1f} KiB with {len(QEMU_CAPS)} qemuCaps "
              f"flags, live pids, memory directories), {expected - 2} pinned reservations in the ledger, "
              "restored before every call")
        print("(b) reads the fake host's config: `python -IS -c` with the hook's library paths calls "
              "dmem_libvirt.hook.main with HookContext.create(config.load(<fake config>))\n")
        base = baseline.median
        print(f"{'case':<64} {'median ms':>9} {'ratio':>6}  goal")
        row(f"baseline: {PYTHON} -I -c pass", base, base)
        row(plain.label, plain.median, base, plain.goal)
        row(dmem.label, dmem.median, base, dmem.goal)
        row(bare.label, bare.median, base)
        row(imports.label, imports.median, base)
        print(f"  note: the baseline's own site import (venv .pth files) costs {base - bare.median:.1f} ms, which "
              f"the hook skips with -S; against a bare `-IS` start (b) is {dmem.median / bare.median:.1f}x")
        if "unavailable" in namespace:
            print(f"{'(b) same, through the installed hook script':<64} not measured: {namespace['unavailable']}")
        else:
            ns_base, ns_hook = statistics.median(namespace["baseline"]), statistics.median(namespace["hook"])
            row("(b) same, through the installed hook script [*]", ns_hook, ns_base, 3.0)
            print(f"[*] config at {config_module.DEFAULT_PATH} by a {namespace['how']} in a private mount "
                  f"namespace; ratio to its own interleaved baseline, {ns_base:.2f} ms; "
                  f"ledger after the last call: {namespace['ledger_after']} entries")

        print("\n(a) starts no interpreter: the hook's /bin/sh half finds neither our namespace nor <memoryBacking>")
        print_import_times("(b) prepare of a dmem guest (driver)",
                           import_times(Case(dmem.label, dmem.argv, stdin=dmem.stdin, before=restore)), options.top)
        print_import_times("baseline", import_times(Case("baseline", [PYTHON, "-I", "-c", "pass"])), 6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
