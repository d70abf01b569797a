"""Emulated dmemfs for hosts whose kernel has none: a tmpfs for the files, a directory for debugfs.

Selected by ``[backend] name = "emulated"`` (or the older ``[dmemfs] emulate = true``); guests are defined
for "dmemfs", so a domain enabled on the emulation is enabled for the real thing.  It keeps the dmemfs
behaviours the product depends on:
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

from ..errors import HostError, PinError
from ..units import format_page_size, format_size
from .dmemfs import DmemfsBackend

TMPFS_MAGIC = 0x01021994
DIRTY_PATTERN = b"DMEM-DIRTY-PAGE!"


class EmulatedDmemfsBackend(DmemfsBackend):
    """dmemfs's pools and page size, read the same way; the page accounting the kernel would do, done here."""

    label = "dmemfs (emulated)"
    fs_magic = TMPFS_MAGIC
    fs_name = "tmpfs (emulated dmemfs)"

    def mount_command(self) -> str:
        return f"mkdir -p {self.mount} && mount -t tmpfs none {self.mount}"

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
