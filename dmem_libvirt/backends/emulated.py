"""Emulated dmemfs for hosts whose kernel has none: a tmpfs for the files, a directory for debugfs.

Selected by ``[backend] name = "emulated"`` (or the older ``[dmemfs] emulate = true``); guests are defined
for "dmemfs", so a domain enabled on the emulation is enabled for the real thing.  Its counters live in
``[dmemfs] debugfs`` when that names one (the sandbox's), else in ``<state dir>/emulated-dmem``, created
and resized to ``[dmemfs.capacity]`` (default DEFAULT_CAPACITY per online node) in ``[dmemfs] page_size``
pages (default 2 MiB).  It keeps the dmemfs behaviours the product depends on:
- capacity and free counts are read from a debugfs-shaped tree (``dpage_shift``, ``node<N>/total_dpages``,
  ``node<N>/free_dpages``, same format as the kernel's) that goes down on pin and up on unpin;
- a node without enough free pages refuses the allocation, as dmemfs would (there with SIGBUS);
- freshly allocated pages are NOT zeroed: they are filled with DIRTY_PATTERN, standing for the previous
  tenant's data, so a pin that forgets to zero is caught by anyone scanning the file.
It does not emulate dmemfs's missing llseek/read/write, nor its statfs magic: files live on tmpfs.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import EMULATED_COUNTERS
from ..errors import HostError, PinError
from ..units import GiB, MiB, format_page_size, format_size
from .dmemfs import DmemfsBackend

if TYPE_CHECKING:
    from ..config import Config
    from ..host import Host

TMPFS_MAGIC = 0x01021994
# Without a debugfs-shaped directory nor [dmemfs.capacity]: this much per online host node, in 2 MiB pages.
DEFAULT_CAPACITY = 1 * GiB
DEFAULT_PAGE_SIZE = 2 * MiB
BASE_PAGE = 4096
DIRTY_PATTERN = b"DMEM-DIRTY-PAGE!"


class EmulatedDmemfsBackend(DmemfsBackend):
    """dmemfs's pools and page size, read the same way; the page accounting the kernel would do, done here."""

    label = "dmemfs (emulated)"
    fs_magic = TMPFS_MAGIC
    fs_name = "tmpfs (emulated dmemfs)"

    def mount_command(self) -> str:
        return f"mkdir -p {self.mount} && mount -t tmpfs none {self.mount}"

    def __init__(self, config: Config, host: Host) -> None:
        super().__init__(config, host)
        if self.debugfs == config.state.dir / EMULATED_COUNTERS:
            self._size_counters()

    def _size_counters(self) -> None:
        """Create or resize the counters beside the ledger to [dmemfs.capacity] (or DEFAULT_CAPACITY per node)."""
        page = self.config.dmemfs.page_size or DEFAULT_PAGE_SIZE
        capacity = self.config.dmemfs.capacity or dict.fromkeys(self.host.online_nodes(), DEFAULT_CAPACITY)
        try:
            self.debugfs.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self._counters():
                changed = not (self.debugfs / "dpage_shift").exists()
                if changed:
                    self._write("dpage_shift", page.bit_length() - 1)
                    self._write("unaligned_pages", 0)
                for node, size in capacity.items():
                    pages = size // page
                    total = self._read_or_zero(f"node{node}/total_dpages")
                    if total == pages and (self.debugfs / f"node{node}" / "free_dpages").exists():
                        continue
                    changed = True
                    (self.debugfs / f"node{node}").mkdir(mode=0o700, exist_ok=True)
                    # Pages pinned now stay taken: only the change of capacity moves the free count.
                    free = self._read_or_zero(f"node{node}/free_dpages")
                    self._write(f"node{node}/total_dpages", pages)
                    self._write(f"node{node}/free_dpages", max(0, free + pages - total))
                if changed:
                    nodes = sorted(int(d.name[4:]) for d in self.debugfs.glob("node[0-9]*"))
                    totals = [self._read(f"node{n}/total_dpages") for n in nodes]
                    self._write("total_dpages", sum(totals))
                    self._write("free_dpages", sum(self._read(f"node{n}/free_dpages") for n in nodes))
                    self._write("region_num", len(nodes))
                    self._write("registered_pages", sum(totals) * page // BASE_PAGE)
        except OSError as err:
            raise HostError(f"cannot set up the emulated dmem counters in {self.debugfs}: {err.strerror}") from None

    def _read_or_zero(self, name: str) -> int:
        return self._read(name) if (self.debugfs / name).exists() else 0

    def fill(self) -> Callable[[int, int], None] | None:
        from ..pin import fill_pattern

        return fill_pattern(DIRTY_PATTERN)

    def allocated(self, domain: str, node: int, size: int) -> None:
        pages = -(-size // self.page_size())
        with self._counters():
            free = self._read(f"node{node}/free_dpages")
            if free < pages:
                raise PinError(
                    f"host node {node} has {format_size(free * self.page_size())} of "
                    f"{format_page_size(self.page_size())} dmem pages free, pinning needs {format_size(size)}",
                    domain,
                )
            self._add(node, -pages)

    def released(self, node: int, size: int) -> None:
        pages = -(-size // self.page_size())
        with self._counters():
            total = self._read(f"node{node}/total_dpages")
            free = self._read(f"node{node}/free_dpages")
            self._add(node, min(pages, total - free))

    def _counters(self) -> _CounterLock:
        return _CounterLock(self.debugfs / ".lock")

    def _read(self, name: str) -> int:
        path = self.debugfs / name
        try:
            text = path.read_text()
        except OSError as err:
            raise HostError(f"cannot read emulated debugfs counter {path}: {err.strerror}") from None
        if not text.strip().isdigit():
            raise HostError(f"cannot parse {path}: {text!r} is not a decimal number")
        return int(text)

    def _add(self, node: int, pages: int) -> None:
        for name in (f"node{node}/free_dpages", "free_dpages"):
            self._write(name, self._read(name) + pages)

    def _write(self, name: str, value: int) -> None:
        path = self.debugfs / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)


class _CounterLock:
    """flock on a file beside the counters: several hooks may pin at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _CounterLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
