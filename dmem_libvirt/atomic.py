"""Replacing a file atomically: a reader sees the old content or the new, never a mix or an empty file.

The data goes to a temporary file in the same directory and is renamed over the target.  With ``sync``
(the default) the file and then the directory are fsynced, so the new content survives a power cut; data that
means nothing after a reboot (counters since boot, a metrics file rewritten every few seconds) skips that:
a process killed at any point still leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def temp_prefix(path: Path) -> str:
    """The name a temporary copy of ``path`` starts with (a pid follows); a crash may leave one behind."""
    return f".{path.name}.tmp-"


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600, sync: bool = True) -> None:
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
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        if sync:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
