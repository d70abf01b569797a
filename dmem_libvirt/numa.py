"""Thin ctypes wrappers for the memory syscalls that pinning needs and the stdlib lacks.

mbind, madvise(MADV_POPULATE_WRITE), memset, mmap/munmap of a shared file, thread CPU affinity.
Every failure raises OSError with the errno; libc is loaded on first use, never at import.  The
foreign calls release the GIL, so several threads can fault and zero in parallel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from typing import NoReturn

MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0
# include/uapi/asm-generic/mman-common.h; Linux >= 5.14.  Unlike touching the pages, it returns an
# error (EFAULT/ENOMEM) where a fault would SIGBUS, which is how dmemfs reports an empty pool.
MADV_POPULATE_WRITE = 23

# glibc has no mbind() wrapper (it lives in libnuma), so the raw syscall is used.
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259, "s390x": 268}

_MAP_FAILED = ctypes.c_void_p(-1).value
_BITS_PER_LONG = ctypes.sizeof(ctypes.c_ulong) * 8


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


def _raise_errno(what: str) -> NoReturn:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def mbind(address: int, length: int, node: int, *, strict: bool = True) -> None:
    """Bind [address, address+length) to one host node (MPOL_BIND), before any page is faulted."""
    if node < 0:
        raise OSError(errno.EINVAL, f"mbind: bad node {node}")
    machine = os.uname().machine  # not platform.machine(): importing platform costs the hook ~1 ms
    number = _SYS_MBIND.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"mbind: unsupported architecture {machine}")
    words = node // _BITS_PER_LONG + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // _BITS_PER_LONG] = 1 << (node % _BITS_PER_LONG)
    # The kernel's get_nodes() decrements maxnode before use (historic off-by-one libnuma also follows).
    maxnode = words * _BITS_PER_LONG + 1
    flags = MPOL_MF_STRICT if strict else 0
    result = _libc().syscall(ctypes.c_long(number), ctypes.c_void_p(address), ctypes.c_ulong(length),
                             ctypes.c_int(MPOL_BIND), mask, ctypes.c_ulong(maxnode), ctypes.c_uint(flags))
    if result != 0:
        _raise_errno("mbind")


def populate_write(address: int, length: int) -> None:
    """Fault in every page of the range writable, without touching it (madvise MADV_POPULATE_WRITE)."""
    if _libc().madvise(address, length, MADV_POPULATE_WRITE) != 0:
        _raise_errno("madvise(MADV_POPULATE_WRITE)")


def memset(address: int, value: int, length: int) -> None:
    """Fill [address, address+length) with the byte ``value``; the GIL is released meanwhile."""
    _libc().memset(address, value, length)


def map_shared(fd: int, length: int, *, writable: bool = True) -> int:
    """mmap(MAP_SHARED) the first ``length`` bytes of ``fd``; returns the address."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _libc().mmap(None, length, prot, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        _raise_errno("mmap")
    return int(address)


def unmap(address: int, length: int) -> None:
    """munmap a range returned by map_shared."""
    if _libc().munmap(address, length) != 0:
        _raise_errno("munmap")


def set_thread_cpus(cpus: frozenset[int]) -> None:
    """Restrict the calling thread (not the process) to ``cpus``; an empty set changes nothing."""
    if cpus:
        # pid 0 = the calling thread: sched_setaffinity acts on a single task.
        os.sched_setaffinity(0, cpus)
