"""`install-hook` from every place pip puts the library: a venv, /usr/local (pip as root into Debian's python),
/usr, --user and --prefix.  Each case is a real pip install of the wheel built from this tree, into a temporary
venv, root, user base or prefix; the installed command writes the hook, and the hook runs as libvirt runs it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
# What libvirt gives a hook: cwd /, an environment of LC_ALL, PATH and HOME only.
LIBVIRT_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
PLAIN_GUEST = b"<domain type='kvm'><name>plain</name><memory unit='MiB'>256</memory></domain>\n"


@dataclass(frozen=True)
class Installed:
    command: Path
    env: dict[str, str]
    python: str


def run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built offline with the venv's setuptools."""
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO])
    [built] = out.glob("dmem_libvirt-*.whl")
    return built


def site_of(root: Path) -> Path:
    """The directory under ``root`` that pip put the package in."""
    [init] = root.glob("**/dmem_libvirt/__init__.py")
    return init.parent.parent


def command_in(root: Path) -> Path:
    [command] = root.glob("**/bin/dmem-libvirt")
    return command


def system_pip(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    # Debian marks its python externally managed: pip installs into it only when told to.
    run([SYSTEM_PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--break-system-packages",
         "--root-user-action=ignore", "--disable-pip-version-check", *argv], env=env)


def in_venv(wheel: Path, tmp: Path) -> Installed:
    venv = tmp / "venv"
    run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv])
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel])
    return Installed(venv / "bin" / "dmem-libvirt", {}, str(venv / "bin" / "python"))


def in_usr_local(wheel: Path, tmp: Path) -> Installed:
    # As `pip install` run by root puts it: Debian's default scheme for root is /usr/local (under --root here).
    system_pip("--root", tmp / "root", wheel)
    site = site_of(tmp / "root")
    assert site == tmp / "root" / "usr/local/lib/python3.11/dist-packages"
    return Installed(tmp / "root" / "usr/local/bin/dmem-libvirt", {"PYTHONPATH": str(site)}, SYSTEM_PYTHON)


def in_usr(wheel: Path, tmp: Path) -> Installed:
    # Where Debian's own tooling installs (its pip maps a bare --prefix /usr to /usr/local).
    system_pip("--prefix", "/usr", "--root", tmp / "root", wheel,
               env={**os.environ, "DEB_PYTHON_INSTALL_LAYOUT": "deb_system"})
    site = site_of(tmp / "root")
    assert site == tmp / "root" / "usr/lib/python3/dist-packages"
    return Installed(tmp / "root" / "usr/bin/dmem-libvirt", {"PYTHONPATH": str(site)}, SYSTEM_PYTHON)


def in_user_site(wheel: Path, tmp: Path) -> Installed:
    env = {"PYTHONUSERBASE": str(tmp / "user")}
    system_pip("--user", wheel, env={**os.environ, **env})
    assert site_of(tmp / "user").is_relative_to(tmp / "user" / "lib")
    # Python finds the user site by itself: no PYTHONPATH.
    return Installed(tmp / "user" / "bin" / "dmem-libvirt", env, SYSTEM_PYTHON)


def in_prefix(wheel: Path, tmp: Path) -> Installed:
    system_pip("--prefix", tmp / "prefix", wheel)
    # Debian's pip adds local/ below the prefix: wherever it went, the command must find its hook.
    site = site_of(tmp / "prefix")
    return Installed(command_in(tmp / "prefix"), {"PYTHONPATH": str(site)}, SYSTEM_PYTHON)


INSTALLS: dict[str, Callable[[Path, Path], Installed]] = {
    "venv": in_venv, "usr-local": in_usr_local, "usr": in_usr, "user": in_user_site, "prefix": in_prefix}


def hook_paths(hook: Path) -> list[str]:
    for line in hook.read_text().splitlines():
        if line.startswith("LIBRARY_PATHS"):
            paths: list[str] = ast.literal_eval(line.split("=", 1)[1].strip())
            return paths
    raise AssertionError(f"{hook} has no LIBRARY_PATHS line")


@pytest.mark.slow
@pytest.mark.parametrize("where", sorted(INSTALLS))
def test_install_hook_works_wherever_pip_put_the_library(wheel: Path, tmp_path: Path, where: str) -> None:
    installed = INSTALLS[where](wheel, tmp_path)
    config = tmp_path / "config.toml"
    run_dir = tmp_path / "run" / "libvirt" / "qemu"
    config.write_text(f'[libvirt]\nrun_dir = "{run_dir}"\n\n[state]\ndir = "{tmp_path / "state"}"\n')
    hooks = tmp_path / "hooks"
    result = run([installed.command, "install-hook", "--config", config, "--hooks-dir", hooks],
                 env={**LIBVIRT_ENV, **installed.env})
    hook = hooks / "qemu.d" / "50-dmem-libvirt"
    # No libvirtd runs for this configuration: installed, and libvirt reads it when it starts.
    assert result.stdout.splitlines()[0] == f"installed {hook}"
    assert "libvirt reads its hooks when libvirtd starts" in result.stdout
    assert hook.read_text().splitlines()[0] == "#!/bin/sh"
    assert f"\nPYTHON={installed.python}\n" in hook.read_text()
    assert str(site_of(tmp_path)) in hook_paths(hook)

    # The hook as libvirt runs it (no PYTHONPATH, no user site): the installation's library, found by itself.
    ran = subprocess.run([str(hook), "plain", "prepare", "begin", "-"], input=PLAIN_GUEST, capture_output=True,
                         env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, b"", b"")
    probe = ("import sys; sys.path[:0] = " + repr(hook_paths(hook)) +
             "; import dmem_libvirt.hook; print(dmem_libvirt.hook.__file__)")
    found = run([installed.python, "-IS", "-c", probe], env=LIBVIRT_ENV, cwd="/")
    assert Path(found.stdout.strip()).is_relative_to(tmp_path)


def test_the_wheel_holds_the_product_only(wheel: Path) -> None:
    """No test harness in what a production host installs: nothing that runs apt-get, useradd or mknod."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = {name: archive.read(name).decode() for name in names if name.endswith(".py")}
    assert "dmem_libvirt/hooks/50-dmem-libvirt" in names
    assert all(name.startswith(("dmem_libvirt/", "dmem_libvirt-")) for name in names), names
    for name, text in sources.items():
        for word in ("apt-get", "useradd", "mknod", "unshare"):
            assert word not in text, f"{name} mentions {word}"
