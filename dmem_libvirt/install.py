"""Installing the hook where libvirt runs it, making the daemon notice, and checking the installation.

libvirt looks for hooks only at daemon start or SIGHUP (measured), so installing or removing the hook
reloads the QEMU driver's daemon — the one whose pid is in ``<run_dir>/driver.pid``, never another
daemon of the machine — or says exactly what to run.  A hook file we did not write is never touched.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DmemError

HOOK_NAME = "50-dmem-libvirt"
OWNER_MARK = "from dmem_libvirt.hook import entry"
RELOAD_STAMP = "hook-reloaded"
DAEMONS = ("libvirtd", "virtqemud")


def hook_path(hooks_dir: Path) -> Path:
    return hooks_dir / "qemu.d" / HOOK_NAME


def hook_template() -> str:
    """The hook script shipped with the package (source tree, or installed data files)."""
    package_root = Path(__file__).resolve().parent.parent
    for candidate in (package_root / "hooks" / HOOK_NAME,
                      Path(sys.prefix) / "share" / "dmem-libvirt" / "hooks" / HOOK_NAME):
        if candidate.is_file():
            return candidate.read_text()
    raise DmemError(f"the hook script {HOOK_NAME} is missing from this installation "
                    f"(looked in {package_root / 'hooks'} and {Path(sys.prefix) / 'share/dmem-libvirt/hooks'})")


def render_hook(template: str, python: str, paths: list[str]) -> str:
    """The template with this installation's interpreter and library paths baked in."""
    lines = template.splitlines(keepends=True)
    # Linux hands everything after the interpreter to it as one argument: the flags must be one word.
    lines[0] = f"#!{python} -IS\n"
    text = "".join(lines)
    return text.replace("LIBRARY_PATHS: list[str] = []", f"LIBRARY_PATHS: list[str] = {paths!r}", 1)


def library_paths() -> list[str]:
    """Where this interpreter finds dmem_libvirt and lxml, for a hook started with -I -S (no site)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def is_ours(path: Path) -> bool:
    try:
        return OWNER_MARK in path.read_text(errors="replace")
    except OSError:
        return False


@dataclass(frozen=True)
class Daemon:
    pid: int
    name: str


def running_daemon(run_dir: Path, proc: Path) -> Daemon | None:
    """The daemon that owns libvirt's QEMU driver state in ``run_dir`` (it holds driver.pid)."""
    try:
        text = (run_dir / "driver.pid").read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    try:
        name = (proc / text / "comm").read_text().strip()
    except OSError:
        return None
    return Daemon(int(text), name) if name in DAEMONS else None


def reload_daemon(run_dir: Path, proc: Path, state_dir: Path) -> str:
    """SIGHUP the QEMU driver's daemon so it rescans hooks; a message for the user."""
    daemon = running_daemon(run_dir, proc)
    if daemon is None:
        return "no running libvirtd/virtqemud found; it will see the hook when it starts"
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except OSError as err:
        raise DmemError(f"cannot signal {daemon.name} (pid {daemon.pid}): {err.strerror}; run "
                        f"'systemctl reload {daemon.name}' or 'kill -HUP {daemon.pid}'") from None
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state_dir / RELOAD_STAMP).write_text(f"{daemon.pid} {time.time()}\n")
    # The daemon rescans hooks from its event loop; give it a moment before the next virsh start.
    time.sleep(0.5)
    return f"reloaded {daemon.name} (pid {daemon.pid})"


def install_hook(hooks_dir: Path, *, python: str | None = None) -> Path:
    """Write the hook executable; refuse to replace a file someone else wrote."""
    target = hook_path(hooks_dir)
    if target.exists() and not is_ours(target):
        raise DmemError(f"{target} exists and was not written by dmem-libvirt; move it away first")
    text = render_hook(hook_template(), python or sys.executable, library_paths())
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = target.with_name(f".{HOOK_NAME}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def uninstall_hook(hooks_dir: Path) -> Path | None:
    """Remove our hook; None when there was none.  Refuses a file we did not write."""
    target = hook_path(hooks_dir)
    if not target.exists():
        return None
    if not is_ours(target):
        raise DmemError(f"{target} was not written by dmem-libvirt; not removing it")
    target.unlink()
    return target
