"""Readers for /proc/<pid>/{maps,numa_maps,cmdline,stat}: who maps a file, how much, under which policy.

The proc root is a parameter (config ``[host] proc``).  A pid that vanishes while being read counts
as not mapping anything.  ``mappers`` also skips tasks the caller may not inspect (ptrace access
check): QEMU is a child of libvirtd, whose hook runs with libvirtd's credentials, so it is readable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import HostError

# Reading a task that exits mid-read gives ENOENT or ESRCH.
_VANISHED = (FileNotFoundError, ProcessLookupError)


def _read(path: Path, *, skip_denied: bool = False) -> str | None:
    """Text of a proc file, None if its process is gone (or, with skip_denied, may not be inspected)."""
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except _VANISHED:
        return None
    except PermissionError:
        if skip_denied:
            return None
        raise HostError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise HostError(f"cannot read {path}: {err.strerror}") from None


def _major_minor(device: int) -> tuple[int, int]:
    return os.major(device), os.minor(device)


def _mapped_ranges(text: str, device: int, inode: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every line of a maps file that maps (device, inode)."""
    wanted_dev = _major_minor(device)
    inode_text = str(inode)
    # Cheap filter first: most processes do not map the file at all.
    if inode_text not in text:
        return
    for line in text.splitlines():
        # "start-end perms offset MM:mm inode   path" (fs/proc/task_mmu.c, show_map_vma)
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[4] != inode_text:
            continue
        major, _, minor = fields[3].partition(":")
        try:
            if (int(major, 16), int(minor, 16)) != wanted_dev:
                continue
            start, _, end = fields[0].partition("-")
            yield int(start, 16), int(end, 16)
        except ValueError:
            raise HostError(f"malformed maps line: {line!r}") from None


def _pids(proc: Path) -> list[int]:
    try:
        names = os.listdir(proc)
    except OSError as err:
        raise HostError(f"cannot list {proc}: {err.strerror}") from None
    return sorted(int(name) for name in names if name.isdigit())


def mappers(proc: Path, device: int, inode: int) -> list[int]:
    """Pids, ascending, whose address space maps the file (device, inode); vanished pids are skipped."""
    found = []
    for pid in _pids(proc):
        # EACCES: /proc/<pid>/maps needs PTRACE_MODE_READ, which fails for e.g. the init of an
        # enclosing user namespace even for root; such a task is not a QEMU that libvirtd started.
        text = _read(proc / str(pid) / "maps", skip_denied=True)
        if text and any(True for _ in _mapped_ranges(text, device, inode)):
            found.append(pid)
    return found


def maps_inode(proc: Path, pid: int, device: int, inode: int) -> int:
    """Bytes of the file (device, inode) mapped by ``pid``; 0 if none or if the process is gone."""
    text = _read(proc / str(pid) / "maps")
    if not text:
        return 0
    return sum(end - start for start, end in _mapped_ranges(text, device, inode))


def numa_policy(proc: Path, pid: int, path: Path) -> str | None:
    """Policy field ("bind:0", "default", ...) of the first mapping of ``path`` in /proc/<pid>/numa_maps.

    ``path`` is compared with what the kernel prints: absolute, symlinks resolved.  None when the
    process does not map it (or is gone).
    """
    text = _read(proc / str(pid) / "numa_maps")
    if not text:
        return None
    wanted = str(path)
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 3 or not fields[2].startswith("file="):
            continue
        # The kernel escapes '=' (and blanks other than space) in the path, so the path runs
        # until the first later field that contains '='.
        parts = [fields[2][len("file="):]]
        for field in fields[3:]:
            if "=" in field:
                break
            parts.append(field)
        if " ".join(parts) == wanted:
            return fields[1]
    return None


@dataclass(frozen=True)
class NumaMapping:
    """One line of /proc/<pid>/numa_maps (fs/proc/task_mmu.c, show_numa_map)."""

    policy: str                      # "bind:0", "default", "interleave:0-1", ...
    file: str                        # the path as the kernel prints it ('\\040' for a space), "" if none
    huge: bool                       # a hugetlb mapping
    page_size: int                   # bytes (kernelpagesize_kB)
    pages: dict[int, int]            # host node -> pages of this mapping faulted there


def numa_mappings(proc: Path, pid: int) -> list[NumaMapping]:
    """Every mapping of ``pid`` with its policy and per-node pages; [] when the process is gone."""
    text = _read(proc / str(pid) / "numa_maps")
    if not text:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 2:
            raise HostError(f"malformed numa_maps line of pid {pid}: {line!r}")
        values: dict[str, str] = {}
        flags: set[str] = set()
        for field in fields[2:]:
            key, equals, value = field.partition("=")
            if equals:
                values[key] = value
            elif field:
                flags.add(field)
        try:
            pages = {int(key[1:]): int(value) for key, value in values.items()
                     if key[:1] == "N" and key[1:].isdigit()}
            page_size = int(values.get("kernelpagesize_kB", "4")) * 1024
        except ValueError:
            raise HostError(f"malformed numa_maps line of pid {pid}: {line!r}") from None
        found.append(NumaMapping(fields[1], values.get("file", ""), "huge" in flags, page_size, pages))
    return found


def cmdline(proc: Path, pid: int) -> list[str]:
    """argv of ``pid`` ([] for a kernel thread, a zombie or a vanished process)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except _VANISHED:
        return []
    except OSError as err:
        raise HostError(f"cannot read {proc / str(pid) / 'cmdline'}: {err.strerror}") from None
    args = raw.split(b"\0")
    if args[-1] == b"":
        args.pop()
    return [os.fsdecode(arg) for arg in args]


def _stat_fields(proc: Path, pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from the state on (field 3); [] when the process is gone."""
    if pid <= 0:
        return []
    text = _read(proc / str(pid) / "stat")
    if not text:
        return []
    # "pid (comm) S ...": comm may contain spaces and parentheses, the state follows the last ')'.
    return text[text.rfind(")") + 1:].split()


def alive(proc: Path, pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead QEMU waiting to be reaped maps nothing)."""
    fields = _stat_fields(proc, pid)
    return bool(fields) and fields[0] not in ("Z", "X", "x")


def start_ticks(proc: Path, pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of stat); None when it is gone."""
    fields = _stat_fields(proc, pid)
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None
