"""End-to-end cost of the hook: `virsh start` + `virsh destroy` cycles in the private sandbox.

Run as root: ``.venv/bin/python bench/e2e_cycle.py [--cycles 10] [--sizes 256M,4G]``.
The same guest, enabled with `dmem-libvirt enable` (file-backed shared RAM, immediate allocation, node-bound),
is cycled with the hook installed (admit, pin = allocate + zero, verify, release) and with the hook removed
(libvirtd reloaded; QEMU then creates and preallocates the file itself): the second is the baseline, measured
in the same run.  Likewise a guest without the project's metadata (anonymous RAM), with and without the hook.
Variants run interleaved, one cycle of each in turn (hook-on and hook-off groups alternating which goes
first), after one untimed warm-up cycle.  Each hook call's latency comes from libvirtd's own log of the
commands it runs; the pin rate is the marginal GiB/s of `start begin` between the smallest and largest size.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dmem_libvirt.install import HOOK_NAME
from dmem_libvirt.units import GiB, MiB, format_size, parse_size

# The sandbox is a test harness, kept beside the tests rather than in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import Sandbox, SandboxError, guest_xml

PLAIN_MEMORY = 256 * MiB
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"
# libvirtd logs every command it runs (hooks included) and its result, with millisecond timestamps.
HOOK_STARTED = re.compile(r"^(\S+ \S+)\+0000: (\d+): debug : virCommandRunAsync:\d+ : About to run .*/"
                          + re.escape(HOOK_NAME) + r" (\S+) (\S+) (\S+)")
COMMAND_DONE = re.compile(r"^(\S+ \S+)\+0000: (\d+): debug : virCommandRun:\d+ : Result ")
OPERATIONS = ("prepare begin", "start begin", "started begin", "stopped end", "release end")


@dataclass
class Variant:
    label: str
    domain: str
    hook: bool
    memory: int
    # (start, destroy) seconds per timed cycle
    times: list[tuple[float, float]] = field(default_factory=list)
    unavailable: str | None = None

    def median(self, pick: Callable[[tuple[float, float]], float]) -> float:
        return statistics.median(pick(t) for t in self.times)


def total(timing: tuple[float, float]) -> float:
    return timing[0] + timing[1]


def variants(box: Sandbox, sizes: Iterable[int]) -> list[Variant]:
    """Define and enable the guests: per size the dmem guest with and without hook; the plain guest."""
    out = []
    for size in sizes:
        name = f"bench-dmem-{size // MiB}m"
        box.define(guest_xml(name, size, domain_type=box.domain_type))
        enabled = box.dmem("enable", name, check=False)
        why = None if enabled.returncode == 0 else (enabled.stderr or enabled.stdout).strip().splitlines()[-1]
        out += [Variant(f"{format_size(size)} dmem guest, hook", name, True, size, unavailable=why),
                Variant(f"{format_size(size)} same XML, no hook", name, False, size, unavailable=why)]
    box.define(guest_xml("bench-plain", PLAIN_MEMORY, domain_type=box.domain_type))
    out += [Variant(f"{format_size(PLAIN_MEMORY)} no metadata, hook", "bench-plain", True, PLAIN_MEMORY),
            Variant(f"{format_size(PLAIN_MEMORY)} no metadata, no hook", "bench-plain", False, PLAIN_MEMORY)]
    return out


def log_hook_commands(box: Sandbox) -> None:
    """Make libvirtd log the commands it runs at debug level (a restart: it reads its config at start)."""
    conf = box.private("/etc/libvirt/libvirtd.conf")
    text = re.sub(r'log_outputs = "\d:', 'log_outputs = "1:', conf.read_text())
    conf.write_text(text + 'log_filters = "1:util.command"\n')
    box.restart_libvirtd()


def cycle(box: Sandbox, domain: str) -> tuple[float, float]:
    started = time.perf_counter()
    box.virsh("start", domain)
    running = time.perf_counter()
    box.virsh("destroy", domain)
    return running - started, time.perf_counter() - running


def measure(box: Sandbox, runs: list[Variant], cycles: int, report: Callable[[str], None]) -> int:
    """Run the cycles; returns the size of libvirtd's log after the warm-up (where timed hook calls start)."""
    hook_installed = box.hook
    warm = 0
    for index in range(cycles + 1):
        # Alternate which group goes first, so neither always follows a reload.
        order = sorted(runs, key=lambda v: v.hook != bool(index % 2))
        for variant in order:
            if variant.unavailable:
                continue
            if variant.hook != hook_installed:
                # Not timed: installing or removing the hook SIGHUPs libvirtd.
                (box.install_hook if variant.hook else box.remove_hook)()
                hook_installed = variant.hook
            try:
                timing = cycle(box, variant.domain)
            except SandboxError as err:
                variant.unavailable = err.line()
                box.virsh("destroy", variant.domain, check=False)
                continue
            if index:
                variant.times.append(timing)
        if index == 0:
            warm = box.private(LIBVIRTD_LOG).stat().st_size
        report("warm-up cycle done" if index == 0 else f"cycle {index}/{cycles} done")
    return warm


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
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def report(runs: list[Variant], latencies: dict[tuple[str, str], list[float]], cycles: int,
           accel: str, up_seconds: float) -> None:
    print(f"\nsandbox up (cold libvirtd, QEMU capability probe included): {up_seconds:.2f} s")
    print(f"virsh start + virsh destroy, {accel}, {cycles} interleaved cycles after one warm-up; medians:")
    print(f"{'variant':<38} {'start':>8} {'destroy':>8} {'cycle':>8}  {'start, cycle vs no hook':>23}")
    for hooked, bare in zip(runs[::2], runs[1::2], strict=True):
        for variant in (hooked, bare):
            if variant.unavailable or not variant.times:
                print(f"{variant.label:<38} unavailable: {variant.unavailable}")
                continue
            ratio = "baseline"
            if variant is hooked and bare.times and not bare.unavailable:
                ratio = (f"{variant.median(lambda t: t[0]) / bare.median(lambda t: t[0]):.2f}x, "
                         f"{variant.median(total) / bare.median(total):.2f}x")
            print(f"{variant.label:<38} {variant.median(lambda t: t[0]):7.3f}s "
                  f"{variant.median(lambda t: t[1]):7.3f}s {variant.median(total):7.3f}s  {ratio:>23}")
    print("\nhook calls (libvirtd's log, ms resolution); median ms per call:")
    print(f"{'guest':<38} " + " ".join(f"{op:>13}" for op in OPERATIONS))
    for variant in runs[::2]:
        cells = []
        for op in OPERATIONS:
            calls = latencies.get((variant.domain, op), [])
            cells.append(f"{statistics.median(calls) * 1000:10.0f} ms" if calls else f"{'-':>13}")
        print(f"{variant.label:<38} " + " ".join(cells))
    pins = {v.memory: latencies.get((v.domain, "start begin"), []) for v in runs[:-2:2] if not v.unavailable}
    pins = {size: calls for size, calls in pins.items() if calls}
    if len(pins) >= 2:
        small, large = min(pins), max(pins)
        extra = statistics.median(pins[large]) - statistics.median(pins[small])
        print(f"\npin rate in `start begin` (allocate + the emulated previous tenant's data + zero), marginal "
              f"{format_size(small)} -> {format_size(large)}: {(large - small) / GiB / extra:.2f} GiB/s")
    for size, calls in sorted(pins.items()):
        print(f"  {format_size(size)}: start begin {statistics.median(calls):.3f} s = "
              f"{size / GiB / statistics.median(calls):.2f} GiB/s including the hook's fixed cost")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--sizes", default="256M,4G", help="dmem guest sizes (256M,4G)")
    parser.add_argument("--root", type=Path, default=Path("/run/dmem-sandbox-bench"))
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))

    # One guest runs at a time: the pool needs room for the largest only.
    box = Sandbox(args.root, max(sizes), hook=True)
    started = time.perf_counter()
    box.up()
    up_seconds = time.perf_counter() - started
    try:
        log_hook_commands(box)
        runs = variants(box, sizes)
        warm = measure(box, runs, args.cycles, lambda line: print(line, flush=True))
        with box.private(LIBVIRTD_LOG).open("rb") as log:
            log.seek(warm)
            latencies = hook_latencies(log.read().decode(errors="replace"))
    finally:
        box.down()
    report(runs, latencies, args.cycles, "KVM" if box.domain_type == "kvm" else "TCG", up_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
