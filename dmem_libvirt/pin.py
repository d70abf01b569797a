"""Pin one guest RAM file: create it exclusively, size it, bind it to a host node, allocate, zero, hand over.

``pin_file`` either returns a file of exactly ``size`` bytes whose every page is allocated under
MPOL_BIND on ``node``, reads as zero, and belongs to ``uid:gid`` with mode 0600 — or raises PinError
(one line: path, size, node, cause) after removing what it created.  It never leaves a half-made file.
"""

from __future__ import annotations

import array
import ctypes
import errno
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import log, numa
from .domain import backing_file_problem
from .errors import PinError
from .units import format_page_size, format_size

_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SCAN_WINDOW = 64 << 20
# Allocate, fill and zero this much at a time (a 2 MiB page; rounded to the backend's page size).
_STEP = 2 << 20
# The emulated previous tenant's data is written at both ends of every page of this size.
_MARK_PAGE = 4096

_T = TypeVar("_T")


@dataclass(frozen=True)
class PinnedFile:
    path: Path
    inode: int
    device: int
    size: int
    node: int
    seconds: float


def pin_file(directory: Path, name: str, size: int, node: int, *, page_size: int, uid: int, gid: int,
             threads: int = 1, cpus: frozenset[int] = frozenset(),
             fill: Callable[[int, int], None] | None = None) -> PinnedFile:
    """Create ``directory/name`` and make it ``size`` bytes of zeroed memory on host node ``node``.

    ``fill(address, length)`` runs after allocation and before zeroing (a backend that emulates
    dmemfs writes a previous tenant's data there).  Zeroing is split over ``threads`` threads, each
    restricted to ``cpus`` (the node's CPUs) when given.
    """
    path = Path(directory) / name
    started = time.perf_counter()
    _check_name(name)
    if page_size <= 0 or size <= 0 or size % page_size:
        raise PinError(f"cannot pin {path}: size {format_size(size)} ({size} bytes) is not a positive "
                       f"multiple of the {format_page_size(page_size)} page size")
    with _directory_fd(Path(directory)) as dir_fd:
        try:
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ELOOP):
                raise PinError(f"cannot pin {path}: it already exists (or is a symlink); "
                               f"refusing to reuse a file a previous guest may have left") from None
            raise PinError(f"cannot create {path}: {err.strerror}") from None
        try:
            info = os.fstat(fd)
            try:
                _allocate_and_zero(fd, path, size, node, page_size, max(1, threads), cpus, fill)
                _step(path, size, node, "fchown", lambda: os.fchown(fd, uid, gid))
                _step(path, size, node, "fchmod", lambda: os.fchmod(fd, 0o600))
            except BaseException:
                _unlink_if_same(dir_fd, name, info)
                raise
        finally:
            os.close(fd)
    return PinnedFile(path=path, inode=info.st_ino, device=info.st_dev, size=size, node=node,
                      seconds=time.perf_counter() - started)


def _allocate_and_zero(fd: int, path: Path, size: int, node: int, page_size: int, threads: int,
                       cpus: frozenset[int], fill: Callable[[int, int], None] | None) -> None:
    # dmemfs knows a file's size only through truncate, and pages must not be touched before it.
    _step(path, size, node, "ftruncate", lambda: os.ftruncate(fd, size))
    address = _step(path, size, node, "mmap", lambda: numa.map_shared(fd, size))
    step = max(page_size, _STEP // page_size * page_size)

    def prepare(start: int, length: int) -> None:
        # Step by step, so the zeroing writes what the fault (and the fill) just brought into the cache.
        for low in range(start, start + length, step):
            part = min(step, start + length - low)
            try:
                numa.populate_write(low, part)
            except OSError as err:
                raise PinError(_populate_message(path, size, node, page_size, err)) from None
            if fill is not None:
                try:
                    fill(low, part)
                except Exception as err:
                    raise PinError(f"cannot pin {path} ({format_size(size)} on host node {node}): "
                                   f"filling failed: {err}") from None
            # dmemfs hands out pages without clearing them: without this the guest reads the last tenant.
            numa.memset(low, 0, part)

    try:
        # The policy must be in place before the first fault: dmemfs allocates at fault time
        # on the node the mapping's policy names, and never migrates afterwards.
        _step(path, size, node, f"binding to host node {node}", lambda: numa.mbind(address, size, node))
        _run_parallel(_chunks(address, size, page_size, threads), cpus, prepare)
    finally:
        numa.unmap(address, size)


def _populate_message(path: Path, size: int, node: int, page_size: int, err: OSError) -> str:
    pages = format_page_size(page_size)
    if err.errno == errno.EINVAL:
        return (f"cannot allocate {path} ({format_size(size)} on host node {node}): the kernel refused "
                f"MADV_POPULATE_WRITE (EINVAL; Linux >= 5.14 is required)")
    return (f"host node {node} cannot supply {format_size(size)} of {pages} pages for {path}: "
            f"the pool is exhausted ({err.strerror or err})")


def _step(path: Path, size: int, node: int, what: str, action: Callable[[], _T]) -> _T:
    try:
        return action()
    except OSError as err:
        raise PinError(f"cannot pin {path} ({format_size(size)} on host node {node}): {what} failed: "
                       f"{err.strerror or err}") from None


def _chunks(address: int, size: int, page_size: int, threads: int) -> list[tuple[int, int]]:
    """Split the mapping into at most ``threads`` page-aligned (start, length) ranges."""
    pages = size // page_size
    count = max(1, min(threads, pages))
    bounds = [(pages * i // count) * page_size for i in range(count + 1)]
    return [(address + lo, hi - lo) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _run_parallel(chunks: list[tuple[int, int]], cpus: frozenset[int],
                  action: Callable[[int, int], None]) -> None:
    """Run ``action`` on every chunk, one thread each (even for one: the caller's affinity stays)."""
    failures: list[BaseException] = []

    def work(start: int, length: int) -> None:
        try:
            try:
                numa.set_thread_cpus(cpus)
            except OSError as err:
                # Affinity only makes zeroing node-local (faster); MPOL_BIND decides where pages live.
                log.warning(f"cannot restrict pinning thread to CPUs {sorted(cpus)}: {err.strerror}")
            action(start, length)
        except BaseException as err:
            failures.append(err)

    workers = [threading.Thread(target=work, args=chunk, name="dmem-pin") for chunk in chunks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]


def fill_pattern(pattern: bytes) -> Callable[[int, int], None]:
    """A ``fill`` that writes ``pattern`` at the start and at the end of every 4 KiB page of the range.

    Every page then holds data that only zeroing removes, at a small fraction of the cost of
    writing it all over: a scan for ``pattern`` finds any page, or any page's head or tail, left unzeroed.
    """
    words = len(pattern) // 8
    if not pattern or len(pattern) % 8 or 2 * len(pattern) > _MARK_PAGE:
        raise ValueError(f"fill pattern must be 8 to {_MARK_PAGE // 2} bytes, a multiple of 8; "
                         f"got {len(pattern)}")
    values = array.array("Q", pattern)
    stride = _MARK_PAGE // 8
    offsets = [(word, values[word]) for word in range(words)]
    offsets += [(stride - words + word, values[word]) for word in range(words)]

    def fill(address: int, length: int) -> None:
        if length % _MARK_PAGE:
            raise ValueError(f"fill length {length} is not a multiple of {_MARK_PAGE} bytes")
        pages = length // _MARK_PAGE
        view = memoryview((ctypes.c_char * length).from_address(address)).cast("B").cast("Q")
        # One strided store per page and word, done by memoryview in C.
        for offset, value in offsets:
            view[offset::stride] = array.array("Q", [value]) * pages

    return fill


def remove_file(directory: Path, name: str) -> bool:
    """Unlink ``directory/name`` without following a symlink; False if it was not there."""
    _check_name(name)
    with _directory_fd(Path(directory)) as dir_fd:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise PinError(f"cannot remove {Path(directory) / name}: {err.strerror}") from None
    return True


def scan_for(path: Path, pattern: bytes) -> int:
    """How many times ``pattern`` occurs in the file (read through a read-only shared mapping)."""
    if not pattern:
        raise ValueError("scan pattern must not be empty")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            count = 0
            overlap = len(pattern) - 1
            for start in range(0, size, _SCAN_WINDOW):
                # Each window reaches len(pattern)-1 bytes into the next, so a match is counted
                # once: in the window where it starts.
                count += view[start:start + _SCAN_WINDOW + overlap].count(pattern)
            return count
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    problem = backing_file_problem(name)
    if problem:
        raise PinError(f"backing file name {name!r} {problem}")


@contextmanager
def _directory_fd(directory: Path) -> Iterator[int]:
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError as err:
        raise PinError(f"cannot open memory directory {directory}: {err.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _unlink_if_same(dir_fd: int, name: str, created: os.stat_result) -> None:
    """Remove the file we created, but not something that replaced it under the same name."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning(f"could not remove half-made backing file {name}: {err.strerror}")
