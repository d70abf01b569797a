"""The hugetlbfs backend against libvirt alone, on this machine's real pools, in the private sandbox.

Run as root: ``.venv/bin/python bench/hugetlbfs.py [--cycles 5] [--sizes 256M,2G] [--hook-server]``.

1. `virsh start` + `virsh destroy` of the same libvirt-native ``<hugepages>`` guest (as `dmem-libvirt enable`
   writes it), per size: with the hook on a pool pre-sized by hand (admission only), with the hook growing
   the pool at `prepare` and shrinking it at `release`, and without the hook on a pool pre-sized by hand
   (the baseline).  Interleaved, one cycle of each in turn (hook-on and hook-off groups alternating which
   goes first), after one untimed warm-up; medians, spread (min-max) and ratios to the baseline.
2. From `virsh start` to its failure for a guest that does not fit: the hook's refusal at `prepare`, a shell
   hook refusing at once (the floor: libvirt, virsh and three hook executions), and libvirt alone on a
   short pool (QEMU starts and fails to map its RAM).
3. Growing and shrinking node 0's 2 MiB pool by 1 GiB with HVO off and on, interleaved: ms per GiB.

Pools and HVO are recorded first and restored at the end (tests/hostpools.py), also on failure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmem_libvirt.install import HOOK_NAME
from dmem_libvirt.units import GiB, MiB, format_size, parse_size

# The sandbox is a test harness, kept beside the tests rather than in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hostpools import HVO, PAGE, HostPools, exclusive, pool, pool_dir, set_pool

from sandbox import Sandbox, SandboxError, guest_xml


@dataclass
class Variant:
    label: str
    domain: str
    hook: bool
    pages: int          # pages pre-sized by hand before each cycle (0: the hook grows the pool)
    times: list[float] = field(default_factory=list)


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def cycle(box: Sandbox, name: str) -> float:
    """Seconds of `virsh start` plus `virsh destroy`."""
    started = time.perf_counter()
    box.virsh("start", name)
    box.virsh("destroy", name)
    return time.perf_counter() - started


def spread(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    """'median (min-max)'."""
    low, mid, high = (v * scale for v in (min(values), statistics.median(values), max(values)))
    digits = 3 if unit == "s" else 1
    return f"{mid:.{digits}f} {unit} ({low:.{digits}f}-{high:.{digits}f})"


def lifecycle(box: Sandbox, sizes: list[int], cycles: int, base: int) -> list[tuple[int, list[Variant]]]:
    """Start+destroy cycles of the three variants per size."""
    table = []
    hook_installed = True
    for size in sizes:
        name = f"bench-huge-{size // MiB}m"
        box.define(guest_xml(name, size, domain_type=box.domain_type, cells=(size,)))
        box.dmem("enable", name, "--nodes", "0")
        pages = size // PAGE
        runs = [Variant("hook, pre-sized pool", name, True, base + pages),
                Variant("hook, grows the pool", name, True, base),
                Variant("no hook, pre-sized pool", name, False, base + pages)]
        for index in range(cycles + 1):
            order = sorted(runs, key=lambda v: v.hook != bool(index % 2))
            for variant in order:
                if variant.hook != hook_installed:
                    # Not timed: installing or removing the hook SIGHUPs libvirtd.
                    (box.install_hook if variant.hook else box.remove_hook)()
                    hook_installed = variant.hook
                if set_pool(variant.pages) != variant.pages:
                    raise SandboxError(f"the kernel did not give {variant.pages} pages of 2 MiB on node 0")
                took = cycle(box, name)
                if pool()[0] != variant.pages:
                    raise SandboxError(f"{variant.label}: node 0's pool ended at {pool()[0]} pages, "
                                       f"not {variant.pages}")
                if index:
                    variant.times.append(took)
            print(f"{format_size(size)}: cycle {index}/{cycles} done", flush=True)
        table.append((size, runs))
        set_pool(base)
    if not hook_installed:
        box.install_hook()
    return table


# The floor of a refusal: libvirt, virsh and three hook executions (prepare, then stopped and release, which
# libvirt runs after a failed start) of a shell script that refuses at once.
SHELL_HOOK = ('#!/bin/sh\n[ "$2 $3" = "prepare begin" ] && { echo "dmem-libvirt: $1: refused" >&2; exit 1; }\n'
              "exit 0\n")


def use_hook(box: Sandbox, kind: str) -> None:
    """"python": dmem-libvirt's hook; "shell": SHELL_HOOK in its place; "none": no hook.  Not timed."""
    path = box.private(f"/etc/libvirt/hooks/qemu.d/{HOOK_NAME}")
    if kind == "shell":
        path.unlink(missing_ok=True)
        path.write_text(SHELL_HOOK)
        path.chmod(0o755)
        box.reload_libvirtd()
        return
    if path.exists() and path.read_text() == SHELL_HOOK:
        path.unlink()
        box.reload_libvirtd()
    (box.install_hook if kind == "python" else box.remove_hook)()


def refusal(box: Sandbox, cycles: int, base: int) -> dict[str, tuple[list[float], str]]:
    """Seconds from `virsh start` to the error, per hook kind, for a guest the pool cannot hold."""
    name = "bench-huge-refused"
    box.define(guest_xml(name, 512 * MiB, domain_type=box.domain_type, cells=(512 * MiB,)))
    box.dmem("enable", name, "--nodes", "0")
    set_pool(base + 64)
    box.use_config(box.hugetlbfs_config())      # no limit: the 64 pages are all there is
    out: dict[str, tuple[list[float], str]] = {kind: ([], "") for kind in ("python", "shell", "none")}
    for index in range(cycles + 1):
        for kind in (("python", "shell", "none") if index % 2 else ("none", "shell", "python")):
            use_hook(box, kind)
            started = time.perf_counter()
            result = box.virsh("start", name, check=False)
            took = time.perf_counter() - started
            if result.returncode == 0:
                raise SandboxError(f"{name} started on a pool of 64 pages")
            times, _ = out[kind]
            if index:
                times.append(took)
            out[kind] = (times, result.stderr.strip().splitlines()[-1])
    use_hook(box, "python")
    set_pool(base)
    return out


def grow_shrink(cycles: int, base: int) -> dict[str, tuple[list[float], list[float]]]:
    """ms to grow node 0's 2 MiB pool by 1 GiB and to shrink it back, HVO off and on, interleaved."""
    nr = pool_dir() / "nr_hugepages"
    step = GiB // PAGE
    out: dict[str, tuple[list[float], list[float]]] = {"off": ([], []), "on": ([], [])}
    for index in range(cycles):
        for state in (("off", "on") if index % 2 else ("on", "off")):
            HVO.write_text("1\n" if state == "on" else "0\n")
            grow = seconds(lambda: nr.write_text(f"{base + step}\n"))
            if pool()[0] != base + step:
                raise SandboxError(f"the kernel gave {pool()[0] - base} of {step} pages")
            shrink = seconds(lambda: nr.write_text(f"{base}\n"))
            out[state][0].append(grow)
            out[state][1].append(shrink)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--sizes", default="256M,2G")
    parser.add_argument("--parts", default="cycle,refusal,pool", help="which measurements (cycle,refusal,pool)")
    parser.add_argument("--root", type=Path, default=Path("/run/dmem-sandbox-hugebench"))
    parser.add_argument("--hook-server", action="store_true",
                        help="run `dmem-libvirt hook-server` in the sandbox: the hook calls go to it")
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    parts = set(args.parts.split(","))
    with exclusive():
        return run(args, sizes, parts)


def run(args: argparse.Namespace, sizes: list[int], parts: set[str]) -> int:
    before = HostPools.take()
    base = pool()[0]
    table: list[tuple[int, list[Variant]]] = []
    refused: dict[str, tuple[list[float], str]] = {}
    pools: dict[str, tuple[list[float], list[float]]] = {}
    accel = "-"
    try:
        if parts & {"cycle", "refusal"}:
            box = Sandbox(args.root, 64 * MiB, hook=True)
            try:
                box.up()
                box.use_config(box.hugetlbfs_config({0: base * PAGE + 2 * max(sizes)}))
                accel = "KVM" if box.domain_type == "kvm" else "TCG"
                if args.hook_server:
                    box.start_hook_server()
                    accel += ", hook calls via the hook server"
                if "cycle" in parts:
                    table = lifecycle(box, sizes, args.cycles, base)
                if "refusal" in parts:
                    refused = refusal(box, args.cycles, base)
            finally:
                box.down()
                before.restore()
        if "pool" in parts:
            pools = grow_shrink(args.cycles, base)
    finally:
        before.restore()
    report(table, refused, pools, args.cycles, accel)
    return 0


def report(table: list[tuple[int, list[Variant]]], refused: dict[str, tuple[list[float], str]],
           pools: dict[str, tuple[list[float], list[float]]], cycles: int, accel: str) -> None:
    if table:
        print(f"\nvirsh start + virsh destroy of a <hugepages> guest on node 0, {accel}, {cycles} interleaved "
              "cycles after a warm-up; median (min-max):")
    for size, runs in table:
        baseline = statistics.median(runs[-1].times)
        for variant in runs:
            ratio = statistics.median(variant.times) / baseline
            print(f"  {format_size(size):>10}  {variant.label:<26} {spread(variant.times):>26}  "
                  f"{'baseline' if variant is runs[-1] else f'{ratio:.2f}x'}")
    if refused:
        print("\nfrom `virsh start` to the error, a 512 MiB guest on a pool of 64 pages; median (min-max):")
        labels = {"python": "dmem-libvirt refuses at prepare", "shell": "a shell hook refusing at prepare",
                  "none": "libvirt alone (QEMU runs)"}
        alone = statistics.median(refused["none"][0])
        for kind, (times, line) in refused.items():
            print(f"  {labels[kind]:<34} {spread(times):>26}  {statistics.median(times) / alone:.2f}x"
                  f"\n    {line[-160:]}")
    if pools:
        print("\nnode 0's 2 MiB pool grown by 1 GiB and shrunk back (sysfs write); median (min-max):")
    for state, (grow, shrink) in pools.items():
        print(f"  HVO {state:<3}  grow {spread(grow, 1000, 'ms')}/GiB   shrink {spread(shrink, 1000, 'ms')}/GiB")


if __name__ == "__main__":
    raise SystemExit(main())
