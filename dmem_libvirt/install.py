"""Installing the hook where libvirt runs it, making the daemon notice, and checking the installation.

libvirt looks for hooks only at daemon start or SIGHUP (measured), so installing or removing the hook
reloads the QEMU driver's daemon — the one whose pid is in ``<run_dir>/driver.pid``, never another
daemon of the machine — when one runs (else libvirt reads the hook when it starts), or fails naming the
exact command to run.  A hook file we did not write is
never touched.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
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
# The interpreter line of the shipped template, which render_hook rewrites.
TEMPLATE_PYTHON = "PYTHON=/usr/bin/python3\n"
TEMPLATE_PACKAGE_PATHS = "PACKAGE_PATHS=''\n"
DAEMONS = ("libvirtd", "virtqemud")


def hook_path(hooks_dir: Path) -> Path:
    return hooks_dir / "qemu.d" / HOOK_NAME


def hook_template() -> str:
    """The hook script shipped inside the package, wherever pip or a package manager put it."""
    from importlib import resources

    template = resources.files(__package__).joinpath("hooks", HOOK_NAME)
    try:
        return template.read_text()
    except OSError as err:
        raise DmemError(f"the hook script {HOOK_NAME} is missing from this installation ({template}: "
                        f"{err.strerror}); reinstall dmem-libvirt") from None


def render_hook(template: str, python: str, paths: list[str]) -> str:
    """The template with this installation's interpreter and library paths baked in."""
    # shlex.quote never puts three quotes in a row: the sh half, a Python string, stays one.
    text = template.replace(TEMPLATE_PYTHON, f"PYTHON={shlex.quote(python)}\n", 1)
    text = text.replace(TEMPLATE_PACKAGE_PATHS, f"PACKAGE_PATHS={shlex.quote(':'.join(paths))}\n", 1)
    return text.replace("LIBRARY_PATHS: list[str] = []", f"LIBRARY_PATHS: list[str] = {paths!r}", 1)


def hook_interpreter(text: str) -> str:
    """The Python a hook script hands our guests to (its PYTHON line), "" when it names none."""
    for line in text.splitlines():
        if line.startswith("PYTHON="):
            words = shlex.split(line[len("PYTHON="):])
            return words[0] if len(words) == 1 else ""
    return ""


def library_paths() -> list[str]:
    """Where this interpreter finds dmem_libvirt and lxml, for a hook started with -I -S (no site)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    # lxml may come from outside this installation's own directories (Debian's python3-lxml beside a venv
    # made with --system-site-packages): -S would hide it, and migrate/restore begin need it.
    found = importlib.util.find_spec("lxml")
    if found is not None and found.origin:
        lxml_parent = str(Path(found.origin).resolve().parent.parent)
        if lxml_parent not in paths:
            paths.append(lxml_parent)
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


def find_daemon(run_dir: Path, proc: Path) -> Daemon | str:
    """The daemon holding ``<run_dir>/driver.pid`` (libvirt's QEMU driver state), or why there is none."""
    pid_file = run_dir / "driver.pid"
    try:
        text = pid_file.read_text().strip()
    except OSError as err:
        return f"{pid_file} cannot be read ({err.strerror})"
    if not text.isdigit():
        return f"{pid_file} holds {text!r}, not a pid"
    try:
        name = (proc / text / "comm").read_text().strip()
    except OSError:
        return f"{pid_file} names pid {text}, which is not running"
    if name not in DAEMONS:
        return f"{pid_file} names pid {text}, which is {name!r}"
    return Daemon(int(text), name)


def daemon_name(run_dir: Path) -> str:
    """The daemon that runs the QEMU driver on this host, whether or not it is running now."""
    # With the modular daemons the QEMU driver lives in virtqemud, whose socket sits beside run_dir.
    return "virtqemud" if (run_dir.parent / "virtqemud-sock").exists() else "libvirtd"


def reload_daemon(run_dir: Path, proc: Path, state_dir: Path) -> str:
    """SIGHUP the QEMU driver's daemon so it rescans hooks; a message for the user.

    No running daemon is not an error: provisioning installs the hook before services start, and libvirt
    reads its hooks when it starts.  Raises DmemError naming the command to run when the daemon cannot be
    signalled.
    """
    daemon = find_daemon(run_dir, proc)
    if not isinstance(daemon, Daemon):
        return (f"no libvirtd or virtqemud is running ({daemon}); libvirt reads its hooks when "
                f"{daemon_name(run_dir)} starts")
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except OSError as err:
        raise DmemError(f"cannot signal {daemon.name} (pid {daemon.pid}): {err.strerror}; "
                        f"run as root: kill -HUP {daemon.pid}") from None
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state_dir / RELOAD_STAMP).write_text(f"{daemon.pid} {time.time()}\n")
    except OSError as err:
        raise DmemError(f"reloaded {daemon.name} (pid {daemon.pid}) but cannot record it in "
                        f"{state_dir / RELOAD_STAMP}: {err.strerror}") from None
    # The daemon rescans hooks from its event loop; give it a moment before the next virsh start.
    time.sleep(0.5)
    return f"reloaded {daemon.name} (pid {daemon.pid})"


def install_hook(hooks_dir: Path, *, python: str | None = None) -> Path:
    """Write the hook executable; refuse to replace a file someone else wrote."""
    target = hook_path(hooks_dir)
    if target.exists() and not is_ours(target):
        raise DmemError(f"{target} exists and was not written by dmem-libvirt; move it away first")
    text = render_hook(hook_template(), python or sys.executable, library_paths())
    # libvirt runs the executables it finds in qemu.d/: a half-installed temporary file must not be one.
    tmp = hooks_dir / f".{HOOK_NAME}.tmp"
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise DmemError(f"cannot create {target.parent}: {err.strerror}") from None
    try:
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DmemError(f"cannot install the hook as {target}: {err.strerror}") from None
    return target


def uninstall_hook(hooks_dir: Path) -> Path | None:
    """Remove our hook; None when there was none.  Refuses a file we did not write."""
    target = hook_path(hooks_dir)
    if not target.exists():
        return None
    if not is_ours(target):
        raise DmemError(f"{target} was not written by dmem-libvirt; not removing it")
    try:
        target.unlink()
    except OSError as err:
        raise DmemError(f"cannot remove the hook {target}: {err.strerror}") from None
    return target
