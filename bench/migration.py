"""What the hook costs a live migration: two sandbox hosts, `virsh migrate --live` back and forth.

Run as root: ``.venv/bin/python bench/migration.py [--rounds 5] [--sizes 256M,2G]``.
Per size, the same guest (enabled with `dmem-libvirt enable`: file-backed shared RAM on the emulated dmemfs
mount, immediate allocation, node-bound) migrates with the hook installed on both hosts (the destination
admits at `migrate begin`, adopts at `prepare`, allocates + zeroes at `start`, verifies at `started`; the
source releases at `stopped`/`release`) and with the hook removed from both (QEMU then creates and
preallocates the file itself): the second is the baseline, measured in the same run.  Each round migrates
every variant there and back (one sample per direction), hook-on and hook-off groups alternating which goes
first, after one untimed warm-up round.  Wall time is `virsh migrate` as a user sees it; downtime is what
libvirt reports for the completed job on the destination (`domjobinfo --completed`); each hook call's
latency comes from each libvirtd's own log.  The guests idle in their firmware: their RAM is almost all
zero pages, which QEMU sends as flags, so the stream itself is short and the fixed costs dominate.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from e2e_cycle import LIBVIRTD_LOG, hook_latencies, log_hook_commands

from dmem_libvirt.units import MiB, format_size, parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import Sandbox, guest_xml

DESTINATION_OPS = ("migrate begin", "prepare begin", "start begin", "started begin")
SOURCE_OPS = ("stopped end", "release end")
DOWNTIME = re.compile(r"^Total downtime:\s+(\d+)\s+ms", re.M)


@dataclass
class Variant:
    label: str
    domain: str
    hook: bool
    memory: int
    # (wall seconds, downtime seconds) per timed migration
    times: list[tuple[float, float]] = field(default_factory=list)

    def median(self, pick: Callable[[tuple[float, float]], float]) -> float:
        return statistics.median(pick(t) for t in self.times)


def spread(variant: Variant, pick: Callable[[tuple[float, float]], float], digits: int = 2) -> str:
    values = sorted(pick(t) for t in variant.times)
    return f"{values[0]:.{digits}f}-{values[-1]:.{digits}f}"


def migrate(source: Sandbox, destination: Sandbox, domain: str) -> tuple[float, float]:
    started = time.perf_counter()
    source.migrate(domain, destination, "--live", "--persistent")
    wall = time.perf_counter() - started
    info = destination.virsh("domjobinfo", "--completed", domain).stdout
    found = DOWNTIME.search(info)
    if found is None:
        raise SystemExit(f"libvirt reported no downtime for {domain}:\n{info}")
    return wall, int(found.group(1)) / 1000


def set_hook(hosts: tuple[Sandbox, Sandbox], installed: bool) -> None:
    for box in hosts:
        (box.install_hook if installed else box.remove_hook)()


def measure(hosts: tuple[Sandbox, Sandbox], runs: list[Variant], rounds: int) -> list[int]:
    """Migrate every variant there and back per round; returns each libvirtd log's size after the warm-up."""
    home, away = hosts
    installed = True
    warm = [0, 0]
    for index in range(rounds + 1):
        order = sorted(runs, key=lambda v: v.hook != bool(index % 2))
        for variant in order:
            if variant.hook != installed:
                set_hook(hosts, variant.hook)
                installed = variant.hook
            there = migrate(home, away, variant.domain)
            back = migrate(away, home, variant.domain)
            if index:
                variant.times += [there, back]
        if index == 0:
            warm = [box.private(LIBVIRTD_LOG).stat().st_size for box in hosts]
        print("warm-up round done" if index == 0 else f"round {index}/{rounds} done", flush=True)
    set_hook(hosts, True)
    return warm


def report(runs: list[Variant], latencies: dict[tuple[str, str], list[float]], rounds: int, accel: str) -> None:
    print(f"\nvirsh migrate --live --persistent between two sandbox hosts, {accel}, {rounds} interleaved rounds "
          f"there and back after one warm-up ({2 * rounds} migrations per variant); medians (min-max):")
    print(f"{'variant':<30} {'wall':>16} {'downtime':>16}  {'wall, downtime vs no hook':>25}")
    for hooked, bare in zip(runs[::2], runs[1::2], strict=True):
        for variant in (hooked, bare):
            ratio = "baseline"
            if variant is hooked:
                ratio = (f"{variant.median(lambda t: t[0]) / bare.median(lambda t: t[0]):.2f}x, "
                         f"{variant.median(lambda t: t[1]) / max(bare.median(lambda t: t[1]), 1e-3):.2f}x")
            print(f"{variant.label:<30} {variant.median(lambda t: t[0]):6.2f}s "
                  f"({spread(variant, lambda t: t[0]):>8}) {variant.median(lambda t: t[1]) * 1000:6.0f}ms "
                  f"({spread(variant, lambda t: t[1] * 1000, 0):>8})  {ratio:>25}")
    print("\nhook calls with the hook installed (libvirtd's log, ms resolution); median ms per call:")
    ops = (*DESTINATION_OPS, *SOURCE_OPS)
    print(f"{'guest':<12} " + " ".join(f"{op:>14}" for op in ops) + f" {'destination':>12} {'source':>8}")
    for variant in runs[::2]:
        medians = {op: statistics.median(calls) for op in ops
                   if (calls := latencies.get((variant.domain, op)))}
        cells = [f"{medians[op] * 1000:11.0f} ms" if op in medians else f"{'-':>14}" for op in ops]
        there = sum(medians.get(op, 0) for op in DESTINATION_OPS)
        back = sum(medians.get(op, 0) for op in SOURCE_OPS)
        print(f"{format_size(variant.memory):<12} " + " ".join(cells)
              + f" {there * 1000:9.0f} ms {back * 1000:5.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="256M,2G", help="guest sizes (256M,2G)")
    parser.add_argument("--root", type=Path, default=Path("/run/dmem-bench-mig"))
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))

    # Both hosts hold every guest at once (they migrate one at a time, and all live on one side between).
    per_node = sum(sizes) + 256 * MiB
    hosts = (Sandbox(Path(f"{args.root}-a"), per_node), Sandbox(Path(f"{args.root}-b"), per_node))
    try:
        for box in hosts:
            box.up()
            log_hook_commands(box)
        home = hosts[0]
        runs = []
        for size in sizes:
            name = f"mig-{size // MiB}m"
            home.define(guest_xml(name, size, domain_type=home.domain_type))
            home.dmem("enable", name)
            home.virsh("start", name)
            runs += [Variant(f"{format_size(size)} dmem guest, hook", name, True, size),
                     Variant(f"{format_size(size)} same XML, no hook", name, False, size)]
        warm = measure(hosts, runs, args.rounds)
        latencies: dict[tuple[str, str], list[float]] = {}
        for box, offset in zip(hosts, warm, strict=True):
            with box.private(LIBVIRTD_LOG).open("rb") as log:
                log.seek(offset)
                for key, calls in hook_latencies(log.read().decode(errors="replace")).items():
                    latencies.setdefault(key, []).extend(calls)
    finally:
        for box in hosts:
            box.down()
    report(runs, latencies, args.rounds, "KVM" if hosts[0].domain_type == "kvm" else "TCG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
