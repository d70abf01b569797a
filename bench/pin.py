"""Pin throughput: GiB/s of ``pin_file`` per thread count, against a plain memset of a fresh file.

Run as root: ``.venv/bin/python bench/pin.py [--sizes 256M,4G] [--reps 5] [--threads 1,2,4]``.
Mounts its own tmpfs in a temporary directory (unmounted at the end).  The baseline, measured in the
same run on the same mount, is what any pin must at least do: create, ftruncate, mmap, memset to
zero (faulting each page in), munmap.  Prints medians and the ratio pin/baseline (goal: >= 0.9 at 1 thread).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dmem_libvirt import numa
from dmem_libvirt.pin import pin_file, remove_file
from dmem_libvirt.units import GiB, format_size, parse_size

PAGE = 4096


def baseline(directory: Path, size: int) -> float:
    """Seconds for the minimum: a fresh file, sized, mapped, zeroed by one thread, unmapped."""
    start = time.perf_counter()
    fd = os.open(directory / "baseline", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        address = numa.map_shared(fd, size)
        numa.memset(address, 0, size)
        numa.unmap(address, size)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    remove_file(directory, "baseline")
    return seconds


def pin(directory: Path, size: int, threads: int) -> float:
    start = time.perf_counter()
    pin_file(directory, "ram-node0", size, 0, page_size=PAGE, uid=0, gid=0, threads=threads)
    seconds = time.perf_counter() - start
    remove_file(directory, "ram-node0")
    return seconds


def median(run: Callable[[], float], reps: int) -> float:
    run()  # warm-up: first touches of the mount and the allocator
    return statistics.median(run() for _ in range(reps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="256M,4G", help="comma-separated file sizes")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per case (median)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts (default: 1..cpu_count and 4)")
    args = parser.parse_args(argv)
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    cpus = os.cpu_count() or 1
    counts = (sorted({int(text) for text in args.threads.split(",")}) if args.threads
              else sorted(set(range(1, cpus + 1)) | {4}))

    with tempfile.TemporaryDirectory(prefix="dmem-pin-bench-") as tmp:
        mount = Path(tmp)
        limit = max(sizes) + 64 * (1 << 20)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit},mode=0700", "tmpfs", str(mount)],
                       check=True)
        try:
            print(f"pin throughput on tmpfs, {cpus} CPUs, median of {args.reps}")
            print(f"{'size':>10} {'variant':>14} {'seconds':>9} {'GiB/s':>7} {'vs baseline':>12}")
            for size in sizes:
                base = median(functools.partial(baseline, mount, size), args.reps)
                print(f"{format_size(size):>10} {'baseline':>14} {base:9.3f} {size / GiB / base:7.2f} "
                      f"{1.0:11.2f}x")
                for threads in counts:
                    took = median(functools.partial(pin, mount, size, threads), args.reps)
                    print(f"{format_size(size):>10} {f'pin {threads} thr':>14} {took:9.3f} "
                          f"{size / GiB / took:7.2f} {base / took:11.2f}x")
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
