"""The host-wide lock: one admission decision at a time across every hook and CLI process.

``HostLock`` is a non-reentrant context manager around flock(2) on a lock file.  Waits are bounded:
after ``timeout`` seconds it raises LockTimeout naming the holder's pid, which every holder writes
into the file.  The kernel drops the lock when the holder's file is closed, including on SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import LedgerError, LockTimeout

# A fixed-width record written with one pwrite: a reader never sees a half-written pid, and a
# shorter pid cannot leave digits of a longer one behind.
_PID_WIDTH = 16
_POLL_FIRST = 0.002
_POLL_MAX = 0.010


def _open(path: Path) -> int:
    try:
        # O_CLOEXEC: a flock belongs to the open file description, so a program we exec must not
        # carry the host lock beyond our own lifetime.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise LedgerError(f"cannot open host lock {path}: {err.strerror}") from None


def _recorded_pid(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = os.read(fd, _PID_WIDTH)
        finally:
            os.close(fd)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def holder_pid(path: Path) -> int | None:
    """The pid of the process holding the lock at ``path``, or None when nobody holds it."""
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # The file keeps the last holder's pid after it is gone: only a busy lock has a holder.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_pid(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class HostLock:
    """``with HostLock(path, timeout):`` holds an exclusive flock on ``path`` for the block."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> HostLock:
        if self._fd is not None:
            raise RuntimeError(f"host lock {self.path} is already held by this object")
        fd = _open(self.path)
        try:
            self._acquire(fd)
            os.pwrite(fd, f"{os.getpid()}\n".ljust(_PID_WIDTH).encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        pause = _POLL_FIRST
        while True:
            try:
                # flock has no timed wait; polling with short sleeps keeps the wait bounded.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, _POLL_MAX)
        pid = _recorded_pid(self.path)
        holder = f"held by pid {pid}" if pid is not None else "holder unknown"
        raise LockTimeout(f"host lock {self.path} busy for {self.timeout:.1f} s, {holder}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing the last descriptor releases the flock.
            os.close(fd)
