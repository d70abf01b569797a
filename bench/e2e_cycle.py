"""End-to-end cost of the hook: `virsh start` + `virsh destroy` cycles in the private sandbox, explained.

Run as root: ``.venv/bin/python bench/e2e_cycle.py [--cycles 9] [--sizes 256M,2G] [--before TREE]``.
The same guest, enabled with `dmem-libvirt enable` (file-backed shared RAM, immediate allocation, node-bound),
is cycled with the hook installed (admit, pin = allocate + zero, verify, release) and with the hook removed
(libvirtd reloaded; QEMU then creates and preallocates the file itself): the second is the baseline, measured
in the same run.  Likewise a guest without the project's metadata (anonymous RAM), with and without the hook,
and with an empty hook (``exit 0``): what libvirt itself spends on running any hook at all, the floor of the
hook's cost for a guest that is not ours.
``--before TREE`` adds, for every guest, the hook of another checkout of the project (say, the previous
release): a before/after comparison under the same load.  Variants run interleaved, one cycle of each in turn
(the groups that share a hook rotating which goes first), after one untimed warm-up cycle.  ``--settle S``
pauses S seconds before every timed cycle: on a virtual machine that hands freed memory back to its
hypervisor (virtio-balloon free page reporting), a guest's RAM faults in slower the longer the memory lay
free, so without a pause the order of the variants weighs on their times.

Each cycle is broken down: `virsh start` and the hook calls inside it; `virsh destroy`, the moment QEMU
exits (a pidfd), the moment libvirt notices (its `qemuProcessStop`), the `stopped end` call (also counted
from QEMU's exit) and `release end`.  The hook calls' times and libvirt's come from libvirtd's own debug log
(ms resolution).
Every figure is the median over the cycles with its spread (min-max).  Ratios: of the medians, and the
median of the per-round ratios (each cycle against the baseline's cycle of the same round).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dmem_libvirt.install import HOOK_NAME
from dmem_libvirt.units import MiB, format_size, parse_size

# The sandbox is a test harness, kept beside the tests rather than in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import REPO, Sandbox, SandboxError, guest_xml

PLAIN_MEMORY = 256 * MiB
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"
# libvirtd logs every command it runs (hooks included) and its result, and the start of qemuProcessStop.
LOG_FILTERS = "1:util.command 1:qemu.qemu_process"
STAMP = r"^(\S+ \S+)\+0000: (\d+): "
HOOK_STARTED = re.compile(STAMP + r"debug : virCommandRunAsync:\d+ : About to run .*/"
                          + re.escape(HOOK_NAME) + r" (\S+) (\S+) (\S+)")
COMMAND_DONE = re.compile(STAMP + r"debug : virCommandRun:\d+ : Result ")
PROCESS_STOP = re.compile(STAMP + r"debug : qemuProcessStop:\d+ : Shutting down vm=\S+ name=(\S+) ")
HOOK_CALLS = ("prepare begin", "start begin", "started begin", "stopped end", "release end")
EMPTY_HOOK = "#!/bin/sh\nexit 0\n"
# What a variant runs as the hook: None, nothing; a Path, that checkout's hook; a str, that script.
Hook = Path | str | None


@dataclass
class Cycle:
    start: float
    destroy: float
    # seconds after `virsh destroy` was called
    qemu_exit: float
    libvirt_stop: float | None = None
    stopped_hook: float | None = None
    # "operation subop" -> seconds
    hooks: dict[str, float] = field(default_factory=dict)
    # CPU seconds of the processes libvirtd ran and reaped during the cycle (the hook calls, mostly)
    children_cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.start + self.destroy


@dataclass
class Variant:
    label: str
    domain: str
    hook: Hook
    memory: int
    cycles: list[Cycle] = field(default_factory=list)
    unavailable: str | None = None


def variants(box: Sandbox, sizes: Iterable[int], before: Path | None) -> list[list[Variant]]:
    """Define and enable the guests.  Rows: per size the dmem guest with the hook (and the hook of
    ``before``) and without; the plain guest likewise.  The last of each row is its baseline."""
    rows = []
    for size in sizes:
        name = f"bench-dmem-{size // MiB}m"
        box.define(guest_xml(name, size, domain_type=box.domain_type))
        enabled = box.dmem("enable", name, check=False)
        why = None if enabled.returncode == 0 else (enabled.stderr or enabled.stdout).strip().splitlines()[-1]
        row = [Variant(f"{format_size(size)} dmem guest, hook", name, REPO, size, unavailable=why)]
        if before is not None:
            row.append(Variant(f"{format_size(size)} dmem guest, hook before", name, before, size,
                               unavailable=why))
        rows.append([*row, Variant(f"{format_size(size)} same XML, no hook", name, None, size, unavailable=why)])
    box.define(guest_xml("bench-plain", PLAIN_MEMORY, domain_type=box.domain_type))
    plain = [Variant(f"{format_size(PLAIN_MEMORY)} no metadata, hook", "bench-plain", REPO, PLAIN_MEMORY)]
    if before is not None:
        plain.append(Variant(f"{format_size(PLAIN_MEMORY)} no metadata, hook before", "bench-plain", before,
                             PLAIN_MEMORY))
    plain.append(Variant(f"{format_size(PLAIN_MEMORY)} no metadata, empty hook", "bench-plain", EMPTY_HOOK,
                         PLAIN_MEMORY))
    rows.append([*plain, Variant(f"{format_size(PLAIN_MEMORY)} no metadata, no hook", "bench-plain", None,
                                 PLAIN_MEMORY)])
    return rows


def install_hook(box: Sandbox, hook: Hook) -> None:
    """Replace whatever hook is installed by ``hook``; libvirtd is reloaded."""
    path = box.private(f"/etc/libvirt/hooks/qemu.d/{HOOK_NAME}")
    path.unlink(missing_ok=True)
    if isinstance(hook, Path):
        # install-hook writes the library path of the package it runs from into the hook (and reloads).
        box.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(hook)!r}); "
                 "from dmem_libvirt.cli import main; sys.exit(main(['install-hook']))"])
        return
    if hook is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hook)
        path.chmod(0o755)
    box.reload_libvirtd()


def log_hook_commands(box: Sandbox) -> None:
    """Make libvirtd log what the breakdown needs at debug level (a restart: it reads its config at start)."""
    conf = box.private("/etc/libvirt/libvirtd.conf")
    text = re.sub(r'log_outputs = "\d:', 'log_outputs = "1:', conf.read_text())
    conf.write_text(text + f'log_filters = "{LOG_FILTERS}"\n')
    box.restart_libvirtd()


def cycle(box: Sandbox, domain: str) -> tuple[Cycle, float]:
    """One `virsh start` + `virsh destroy` (and when destroy was called); QEMU's exit is seen through a pidfd."""
    daemon = box.libvirtd_pid()
    cpu = children_cpu(daemon)
    began = time.perf_counter()
    box.virsh("start", domain)
    running = time.perf_counter()
    pidfd = os.pidfd_open(box.qemu_pid(domain))
    failure: list[BaseException] = []

    def destroy() -> None:
        try:
            box.virsh("destroy", domain)
        except BaseException as err:
            failure.append(err)

    try:
        called = time.time()
        worker = threading.Thread(target=destroy)
        worker.start()
        select.select([pidfd], [], [], 60)
        exited = time.time() - called
        worker.join()
    finally:
        os.close(pidfd)
    if failure:
        raise failure[0]
    return Cycle(running - began, time.perf_counter() - running, exited,
                 children_cpu=children_cpu(daemon) - cpu), called


def children_cpu(pid: int | None) -> float:
    """User + system CPU seconds of the reaped children of ``pid`` (/proc/PID/stat cutime, cstime)."""
    if pid is None:
        raise SandboxError("libvirtd is not running in the sandbox")
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def measure(box: Sandbox, runs: list[Variant], cycles: int, settle: float) -> None:
    installed: Hook = REPO
    log = box.private(LIBVIRTD_LOG)
    groups: list[Hook] = list(dict.fromkeys(v.hook for v in runs))
    for index in range(cycles + 1):
        # Rotate which group goes first, so none always follows a reload.
        first = groups[index % len(groups):] + groups[:index % len(groups)]
        for variant in sorted(runs, key=lambda v: first.index(v.hook)):
            if variant.unavailable:
                continue
            if variant.hook != installed:
                # Not timed: installing or removing the hook SIGHUPs libvirtd.
                install_hook(box, variant.hook)
                installed = variant.hook
            time.sleep(settle)
            offset = log.stat().st_size
            try:
                timing, called = cycle(box, variant.domain)
            except SandboxError as err:
                variant.unavailable = err.line()
                box.virsh("destroy", variant.domain, check=False)
                continue
            if index:
                with log.open("rb") as stream:
                    stream.seek(offset)
                    explain(timing, variant.domain, called, stream.read().decode(errors="replace"))
                variant.cycles.append(timing)
        print("warm-up cycle done" if index == 0 else f"cycle {index}/{cycles} done", flush=True)


def explain(timing: Cycle, domain: str, destroy_called: float, log: str) -> None:
    """Fill in the hook calls and libvirt's stop from the log lines of this one cycle."""
    pending: dict[str, tuple[float, str]] = {}
    for line in log.splitlines():
        if started := HOOK_STARTED.match(line):
            stamp, thread, name, operation, subop = started.groups()
            if name == domain:
                pending[thread] = (_seconds(stamp), f"{operation} {subop}")
                if operation == "stopped":
                    timing.stopped_hook = _seconds(stamp) - destroy_called
        elif (done := COMMAND_DONE.match(line)) and done.group(2) in pending:
            began, call = pending.pop(done.group(2))
            timing.hooks[call] = _seconds(done.group(1)) - began
        elif (stop := PROCESS_STOP.match(line)) and stop.group(3) == domain:
            timing.libvirt_stop = _seconds(stop.group(1)) - destroy_called


def hook_latencies(log: str) -> dict[tuple[str, str], list[float]]:
    """(domain, "operation subop") -> seconds of every hook call libvirtd logged."""
    pending: dict[str, tuple[float, str, str]] = {}
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in log.splitlines():
        if started := HOOK_STARTED.match(line):
            stamp, thread, domain, operation, subop = started.groups()
            pending[thread] = (_seconds(stamp), domain, f"{operation} {subop}")
        elif (done := COMMAND_DONE.match(line)) and done.group(2) in pending:
            began, domain, operation = pending.pop(done.group(2))
            out[(domain, operation)].append(_seconds(done.group(1)) - began)
    return out


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def spread(values: list[float]) -> str:
    """Median and min-max in ms."""
    if not values:
        return f"{'-':>17}"
    return f"{statistics.median(values) * 1000:5.0f} [{min(values) * 1000:4.0f}-{max(values) * 1000:4.0f}]"


def ratio(hooked: Variant, bare: Variant, pick: str) -> str:
    if not (hooked.cycles and bare.cycles):
        return "-"
    mine = statistics.median(getattr(c, pick) for c in hooked.cycles)
    base = statistics.median(getattr(c, pick) for c in bare.cycles)
    return f"{mine / base:.2f}x"


def paired_ratio(hooked: Variant, bare: Variant) -> str:
    """Median of the cycle ratios round by round (a variant that failed a round has fewer cycles: none)."""
    if not hooked.cycles or len(hooked.cycles) != len(bare.cycles):
        return "-"
    paired = [h.total / b.total for h, b in zip(hooked.cycles, bare.cycles, strict=True)]
    return f"{statistics.median(paired):.2f}x"


def report(rows: list[list[Variant]], cycles: int, settle: float, accel: str, load: tuple[str, str]) -> None:
    print(f"\nvirsh start + virsh destroy, {accel}, {cycles} interleaved cycles after one warm-up, "
          f"{settle:g} s pause before each; loadavg before: {load[0]}, after: {load[1]}")
    print("ms, median [min-max] over the cycles; destroy's events are counted from the `virsh destroy` call")
    columns = ("start", "destroy", "cycle", "QEMU exit", "libvirt stop", "stopped hook", "exit->stopped")
    print(f"{'variant':<34} " + " ".join(f"{c:>17}" for c in columns)
          + "   start  cycle (ratio of medians)  cycle (median of per-round ratios)")
    for row in rows:
        bare = row[-1]
        for variant in row:
            if variant.unavailable or not variant.cycles:
                print(f"{variant.label:<34} unavailable: {variant.unavailable}")
                continue
            cs = variant.cycles
            cells = [spread([c.start for c in cs]), spread([c.destroy for c in cs]),
                     spread([c.total for c in cs]), spread([c.qemu_exit for c in cs]),
                     spread([c.libvirt_stop for c in cs if c.libvirt_stop is not None]),
                     spread([c.stopped_hook for c in cs if c.stopped_hook is not None]),
                     spread([c.stopped_hook - c.qemu_exit for c in cs if c.stopped_hook is not None])]
            ratios = ("baseline" if variant is bare
                      else f"{ratio(variant, bare, 'start'):>7} {ratio(variant, bare, 'total'):>6}"
                           f"{paired_ratio(variant, bare):>23}")
            print(f"{variant.label:<34} " + " ".join(cells) + f"   {ratios}")
    print("\nhook calls as libvirtd ran them (process start to exit), ms, median [min-max]; CPU: what everything")
    print("libvirtd ran in the cycle used (the hook processes; without the hook almost nothing), 10 ms resolution:")
    print(f"{'variant':<34} " + " ".join(f"{op:>17}" for op in HOOK_CALLS) + f" {'sum':>17} {'CPU':>17}")
    for variant in (v for row in rows for v in row):
        if not variant.cycles:
            continue
        calls = [spread([c.hooks[op] for c in variant.cycles if op in c.hooks]) for op in HOOK_CALLS]
        sums = spread([sum(c.hooks.values()) for c in variant.cycles])
        cpu = spread([c.children_cpu for c in variant.cycles])
        print(f"{variant.label:<34} " + " ".join(calls) + f" {sums} {cpu}")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=9)
    parser.add_argument("--sizes", default="256M,2G", help="dmem guest sizes (256M,2G)")
    parser.add_argument("--root", type=Path, default=Path("/run/dmem-sandbox-bench"))
    parser.add_argument("--before", type=Path, help="another checkout whose hook is measured alongside")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to pause before every timed cycle (see above: free page reporting)")
    parser.add_argument("--hook-server", action="store_true",
                        help="run `dmem-libvirt hook-server` in the sandbox: this checkout's hook calls go to it "
                             "(another checkout's, --before, run in their own process)")
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))

    # One guest runs at a time: the pool needs room for the largest only.
    box = Sandbox(args.root, max(sizes), hook=True)
    box.up()
    before = loadavg()
    try:
        log_hook_commands(box)
        if args.hook_server:
            box.start_hook_server()
            print("hook server: running in the sandbox, serving this checkout's hook calls")
        rows = variants(box, sizes, args.before.resolve() if args.before else None)
        measure(box, [v for row in rows for v in row], args.cycles, args.settle)
    finally:
        box.down()
    report(rows, args.cycles, args.settle, "KVM" if box.domain_type == "kvm" else "TCG", (before, loadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
