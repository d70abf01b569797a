"""Replacing a file atomically: a reader sees the old content or the new, never a mix or an empty file.

The data goes to a temporary file in the same directory, is fsynced, renamed over the target, and the
directory is fsynced so the rename survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def temp_prefix(path: Path) -> str:
    """The name a temporary copy of ``path`` starts with (a pid follows); a crash may leave one behind."""
    return f".{path.name}.tmp-"


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``; raises OSError, leaving no temporary file behind."""
    # The temporary name does not end like the target's: readers that glob (node_exporter reads *.prom)
    # never pick it up.
    temp = path.with_name(f"{temp_prefix(path)}{os.getpid()}")
    try:
        # Ours alone: left over only by a killed process that had our pid, never followed if a link.
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
