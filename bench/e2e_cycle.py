"""End-to-end cost of one `virsh start` + `virsh destroy` of a 256 MiB guest in the private sandbox.

Run as root: ``.venv/bin/python bench/e2e_cycle.py [--cycles N]``.  Variants run interleaved, one cycle of
each in turn, so drift (other load on the machine) hits them all alike.  The baseline, measured in the same
run, is a guest with anonymous RAM and no hook installed; every variant is reported as its median and its
ratio to the baseline's median.  A variant whose prerequisites fail is reported as unavailable, with why.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmem_libvirt.sandbox import Sandbox, SandboxError, guest_xml
from dmem_libvirt.units import GiB, MiB

GUEST_MEMORY = 256 * MiB


@dataclass
class Variant:
    name: str
    domain: str
    hook: bool
    # (start, destroy) seconds per cycle
    times: list[tuple[float, float]] = field(default_factory=list)
    unavailable: str | None = None


def variants(box: Sandbox) -> list[Variant]:
    """Define the guests; the last variant needs the product's `enable` and hook."""
    box.define(guest_xml("bench-plain", GUEST_MEMORY, domain_type=box.domain_type))
    box.define(guest_xml("bench-file", GUEST_MEMORY, domain_type=box.domain_type, file_backed=True))
    box.define(guest_xml("bench-dmem", GUEST_MEMORY, domain_type=box.domain_type))
    out = [Variant("anonymous RAM, no hook (baseline)", "bench-plain", hook=False),
           Variant("file-backed on the dmem mount, no hook", "bench-file", hook=False),
           Variant("anonymous RAM, hook installed (fast exit)", "bench-plain", hook=True),
           Variant("dmem-libvirt enable + hook (admit, pin, zero)", "bench-dmem", hook=True)]
    enabled = box.dmem("enable", "bench-dmem", check=False)
    if enabled.returncode != 0:
        out[-1].unavailable = (enabled.stderr.strip() or enabled.stdout.strip()).splitlines()[-1]
    return out


def cycle(box: Sandbox, domain: str) -> tuple[float, float]:
    started = time.perf_counter()
    box.virsh("start", domain)
    running = time.perf_counter()
    box.virsh("destroy", domain)
    return running - started, time.perf_counter() - running


def measure(box: Sandbox, runs: list[Variant], cycles: int, report: Callable[[str], None]) -> None:
    hook_installed = box.hook
    for index in range(cycles):
        for variant in runs:
            if variant.unavailable:
                continue
            if variant.hook != hook_installed:
                # Not timed: installing or removing the hook SIGHUPs libvirtd.
                (box.install_hook if variant.hook else box.remove_hook)()
                hook_installed = variant.hook
            try:
                variant.times.append(cycle(box, variant.domain))
            except SandboxError as err:
                variant.unavailable = err.line()
                box.virsh("destroy", variant.domain, check=False)
        report(f"cycle {index + 1}/{cycles} done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("/run/dmem-sandbox-bench"))
    args = parser.parse_args()

    box = Sandbox(args.root, 2 * GiB, hook=True)
    started = time.perf_counter()
    box.up()
    up_seconds = time.perf_counter() - started
    try:
        runs = variants(box)
        measure(box, runs, args.cycles, lambda line: print(line, flush=True))
    finally:
        box.down()

    accel = "KVM" if box.domain_type == "kvm" else "TCG"
    print(f"\nsandbox up (cold libvirtd, QEMU capability probe included): {up_seconds:.2f} s")
    print(f"start + destroy of a {GUEST_MEMORY // MiB} MiB guest ({accel}), "
          f"{args.cycles} interleaved cycles:")
    baseline = statistics.median(sum(t) for t in runs[0].times) if runs[0].times else None
    print(f"{'variant (medians)':<48} {'start':>8} {'destroy':>8} {'cycle':>8} {'ratio':>6}")
    for variant in runs:
        if variant.unavailable or not variant.times:
            print(f"{variant.name:<48} unavailable: {variant.unavailable}")
            continue
        start = statistics.median(t[0] for t in variant.times)
        destroy = statistics.median(t[1] for t in variant.times)
        total = statistics.median(sum(t) for t in variant.times)
        ratio = f"{total / baseline:.2f}x" if baseline else "-"
        print(f"{variant.name:<48} {start:7.3f}s {destroy:7.3f}s {total:7.3f}s {ratio:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
