"""The machine's hugepage pools and HVO setting: host-global state that tests and benchmarks change.

`HostPools.take()` records every pool's ``nr_hugepages`` (global and per node) and ``nr_overcommit_hugepages``
and ``vm.hugetlb_optimize_vmemmap``; `restore()` writes them back (per-node pools first: the global count is
their sum).  `exclusive()` serializes whoever changes them on this machine (two test runs or benchmarks at
once would see each other's pages).  `pool`/`set_pool` read and size one node's pool as an operator would.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dmem_libvirt.units import KiB, MiB

PAGE = 2 * MiB
HUGEPAGES = Path("/sys/kernel/mm/hugepages")
NODES = Path("/sys/devices/system/node")
HVO = Path("/proc/sys/vm/hugetlb_optimize_vmemmap")
LOCK = Path("/run/lock/dmem-libvirt-hugepages.lock")
LOCK_WAIT = 900.0


_held = 0  # how deep this process already holds the lock (a module-wide fixture, then a test's own)


@contextlib.contextmanager
def exclusive(wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the machine-wide lock of the hugepage pools (waiting up to ``wait`` seconds for it).

    Reentrant within a process: a second flock on another descriptor of the file would wait for ourselves.
    """
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another test run or benchmark has held {LOCK} for {wait:.0f} s") from None
                time.sleep(0.5)
        _held = 1
        try:
            yield
        finally:
            _held = 0
    finally:
        os.close(fd)


@dataclass(frozen=True)
class HostPools:
    """The host-global hugepage and HVO settings, as files and their text."""

    values: dict[Path, str]

    @classmethod
    def take(cls) -> HostPools:
        paths = [p / name for p in sorted(HUGEPAGES.glob("hugepages-*kB"))
                 for name in ("nr_hugepages", "nr_overcommit_hugepages")]
        paths += sorted(NODES.glob("node*/hugepages/hugepages-*kB/nr_hugepages"))
        paths += [HVO] if HVO.exists() else []
        return cls({path: path.read_text() for path in paths})

    def restore(self) -> None:
        """Write back what changed; raises AssertionError naming what the kernel would not give back."""
        # The global nr_hugepages is the sum of the nodes': writing the nodes restores it.
        writable = [p for p in self.values if not (p.name == "nr_hugepages" and p.parent.parent == HUGEPAGES)]
        ordered = sorted(writable, key=lambda p: (p == HVO, p.parent.parent == HUGEPAGES, str(p)))
        for _ in range(3):
            for path in ordered:
                if path.read_text() != self.values[path]:
                    path.write_text(self.values[path])
            if HostPools.take() == self:
                return
            time.sleep(0.5)
        changed = {str(p): (v, p.read_text()) for p, v in self.values.items() if p.read_text() != v}
        raise AssertionError(f"could not restore the host's hugepage pools (was, is): {changed}")


def pool_dir(node: int = 0, size: int = PAGE) -> Path:
    return NODES / f"node{node}" / "hugepages" / f"hugepages-{size // KiB}kB"


def pool(node: int = 0, size: int = PAGE) -> tuple[int, int]:
    """(nr_hugepages, free_hugepages) of the machine's node pool."""
    directory = pool_dir(node, size)
    return int((directory / "nr_hugepages").read_text()), int((directory / "free_hugepages").read_text())


def set_pool(pages: int, node: int = 0, size: int = PAGE) -> int:
    """Size the node's pool by hand, as an operator does; returns what the kernel gave."""
    (pool_dir(node, size) / "nr_hugepages").write_text(f"{pages}\n")
    return pool(node, size)[0]
