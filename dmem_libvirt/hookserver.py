"""A resident process that runs hook calls in children forked from an interpreter with the hook's modules loaded.

libvirt starts the hook five times per guest start and stop, and each start of an interpreter that imports
the package costs ~50 ms of CPU.  When SOCKET answers, the hook script hands its call here instead; when it
does not (no server, another installation's, one from before an upgrade), the call runs in the hook's own
process, so the server speeds the hook up and is never needed for it to work.

Protocol (one connection per call, root only): the script's client (perl, which starts in a fifth of
Python's time) sends HEADER, the script's interpreter, its LIBRARY_PATHS joined by ":", the argument count
and the arguments, each ended by a NUL, then the domain XML up to EOF.  The worker (a child forked per
connection) takes the client's own stdout and stderr (pidfd_getfd: the very descriptors libvirt reads), answers
``run`` before it starts the call, then ``exit N``; ``skip`` means "run it yourself" (the client runs the
script's Python half with the XML it holds): the script would import another installation of the package,
the package's files changed since the server started (an upgrade: the server then exits, and systemd starts
it again on the new code), or the client's descriptors cannot be taken.  Each call reads the config and
the ledger as a call in its own process does; only the imports are done once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from .errors import DmemError

SOCKET = Path("/run/dmem-libvirt/hook.sock")
HEADER = b"dmem-libvirt-hook/2"
# The modules a hook call of one of our guests imports, loaded once here.
PRELOAD = ("dmem_libvirt.hook", "dmem_libvirt.lifecycle", "dmem_libvirt.config", "dmem_libvirt.ledger",
           "dmem_libvirt.domain", "dmem_libvirt.xmlsafe", "dmem_libvirt.adopt", "dmem_libvirt.pin",
           "dmem_libvirt.backends.dmemfs", "dmem_libvirt.backends.emulated", "dmem_libvirt.backends.hugetlbfs",
           "dmem_libvirt.domxml", "dmem_libvirt.procmaps", "dmem_libvirt.counters", "lxml.etree")
MAX_REQUEST = 10 * 1024 * 1024 + 64 * 1024
# Resolved once, not in every call: what same_installation compares a script's paths with.
_PACKAGE = Path(__file__).resolve().parent
_INTERPRETER = Path(sys.executable).resolve()


def code_paths() -> list[Path]:
    """The package's modules and its directories (whose times change when a module is added or replaced)."""
    root = _PACKAGE
    directories = [root, *(path for path in root.rglob("*") if path.is_dir() and path.name != "__pycache__")]
    return sorted([*directories, *root.rglob("*.py")])


def fingerprint(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """What identifies the code on disk: each path's size and modification time (stat only, no listing)."""
    found = []
    for path in paths:
        try:
            info = path.stat()
        except FileNotFoundError:
            found.append((str(path), -1, -1))
            continue
        found.append((str(path), info.st_size, info.st_mtime_ns))
    return tuple(found)


def serve(path: Path = SOCKET) -> int:
    """Listen on ``path`` until SIGTERM or SIGINT (or an upgrade of the package); returns the exit status."""
    import importlib

    from . import log

    for module in PRELOAD:
        importlib.import_module(module)
    listener = _listen(path)
    paths = code_paths()
    loaded = fingerprint(paths)
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        listener.close()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # Workers are reaped by the kernel; each sets SIGCHLD back for what it runs.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    log.event("hook-server-start", socket=path, pid=os.getpid())
    try:
        while not stop:
            try:
                conn, _ = listener.accept()
            except OSError:
                if stop:
                    break
                raise
            if os.fork() == 0:  # the worker
                code = 1
                try:
                    listener.close()
                    code = _work(conn, paths, loaded)
                finally:
                    # Closed before the exit tears the address space down: the script waits for this EOF.
                    conn.close()
                    os._exit(code)
            conn.close()
    finally:
        with contextlib.suppress(OSError):
            if path.is_socket():
                path.unlink()
        log.event("hook-server-stop", socket=path)
    return 0


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError:
        pass
    else:
        raise DmemError(f"a hook server already listens on {path}")
    finally:
        probe.close()
    with contextlib.suppress(OSError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as err:
        raise DmemError(f"cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def same_installation(executable: str, library_paths: list[str]) -> bool:
    """Would a hook script run by ``executable`` with ``library_paths`` first import this very package?"""
    for directory in filter(None, library_paths):
        if (Path(directory) / "dmem_libvirt" / "__init__.py").is_file():
            return Path(directory).resolve() == _PACKAGE.parent
    # Found on the interpreter's own path: ours if it is our interpreter.
    return bool(executable) and Path(executable).resolve() == _INTERPRETER


def _work(conn: socket.socket, paths: list[Path], loaded: tuple[tuple[str, int, int], ...]) -> int:
    """One call, in a forked child: check who asks and for which code, run it, say how it ended."""
    import io
    import struct

    from . import hook

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    if uid != 0:
        return 1
    data = b""
    while len(data) < MAX_REQUEST:
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    fds = _peer_output(conn, pid)
    try:
        fields = data.split(b"\0", 4)
        if len(fds) != 2 or len(fields) < 5 or fields[0] != HEADER or not fields[3].isdigit() or \
                not same_installation(os.fsdecode(fields[1]), os.fsdecode(fields[2]).split(":")):
            conn.sendall(b"skip\n")
            return 0
        if fingerprint(paths) != loaded:
            conn.sendall(b"skip\n")
            # The package changed under us: the next call starts a server with the new code (systemd).
            os.kill(os.getppid(), signal.SIGTERM)
            return 0
        count = int(fields[3])
        rest = fields[4].split(b"\0", count)
        argv = [os.fsdecode(arg) for arg in rest[:count]]
        xml = rest[count] if len(rest) > count else b""
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        conn.sendall(b"run\n")
        sys.argv = argv
        stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - fd 1 outlives the call
        stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        try:
            code = hook.main(argv, io.BytesIO(xml), stdout, stderr)
        finally:
            stdout.flush()
            stderr.flush()
        conn.sendall(b"exit %d\n" % code)
        return 0
    finally:
        for fd in fds:
            os.close(fd)


# Linux >= 6.5 (include/uapi/asm-generic/socket.h); the same number on every architecture but a few old ones.
_SO_PEERPIDFD = 77
# pidfd_getfd(2), Linux >= 5.6: 438 on every architecture (the unified syscall table).
_SYS_PIDFD_GETFD = 438


def _peer_output(conn: socket.socket, pid: int) -> list[int]:
    """Duplicates of the connecting process's stdout and stderr; [] when they cannot be taken."""
    import ctypes

    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        # An older kernel: the client is blocked on this connection until it is answered, so ``pid`` is it.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return []
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fds = [libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0) for target in (1, 2)]
    finally:
        os.close(pidfd)
    if min(fds) < 0:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        return []
    return fds
