"""The two-NUMA-node test VM's disk image: Debian bookworm with libvirt, QEMU and a venv for the project.

`ensure_image()` returns a cached image, building it when absent.  The cache lives outside the clone
(``$DMEM_NUMAVM_CACHE``, default CACHE_DIR), one directory per key (image_key: the packages, the build
steps, the VM's init script, the entry points in pyproject.toml); images unused for UNUSED_DAYS are
pruned.  The project's code is not in the key: the runner hands the current tree to the VM on a second
disk at every boot, where the venv's editable install finds it, so a code change costs no rebuild.  Only
Debian packages are downloaded, from the Debian mirror in this machine's apt sources.  Needs root,
debootstrap and e2fsprogs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox import mount_points

SUITE = "bookworm"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"
CACHE_DIR = Path("/var/cache/dmem-libvirt/numa-vm")
CACHE_ENV = "DMEM_NUMAVM_CACHE"
# debootstrap's own dependency resolution handles these; the rest goes through apt in the chroot.
BASE_PACKAGES = ("linux-image-cloud-amd64", "systemd-sysv", "udev", "kmod", "iproute2", "numactl", "python3")
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86",
            "python3-libvirt", "python3-lxml", "python3-venv", "python3-setuptools", "python3-wheel",
            # The rest of what tests/sandbox.py checks for (util-linux and mount are in every Debian).
            "libxml2-utils")
# Where the project lives in the VM: the venv's editable install points at SRC, which the init script
# refills from the second disk at every boot.
PROJECT = Path("/opt/dmem-libvirt")
SRC = PROJECT / "src"
VENV = PROJECT / "venv"
# Room left free on the root filesystem for libvirt's state and logs (guest RAM lives on tmpfs).
HEADROOM = 512 * 1024 * 1024
# Images of other inputs (other branches, older package lists) are kept this long after their last use.
UNUSED_DAYS = 7
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Blocks every service start while packages are installed in the chroot.
POLICY_RC_D = "#!/bin/sh\nexit 101\n"


class ImageError(Exception):
    """The image cannot be built."""


@dataclass(frozen=True)
class Image:
    """A built image: boot it with `-kernel kernel -initrd initrd`, root on `disk` (read-only: -snapshot)."""

    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.directory / "root.raw"

    @property
    def ready(self) -> Path:
        return self.directory / "ready"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or CACHE_DIR)


def image_key() -> str:
    """The hash of what makes the image: the packages, the build steps, the init script baked into it and
    what the editable install records from pyproject.toml (name, entry points, package layout).  Not the
    rest of this module, nor the project's code, which reaches the VM at every boot."""
    with open(REPO / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)
    installed = {"name": project["project"]["name"], "scripts": project["project"].get("scripts"),
                 "setuptools": project.get("tool", {}).get("setuptools")}
    recipe = [SUITE, *BASE_PACKAGES, "--", *PACKAGES, str(PROJECT), str(HEADROOM), POLICY_RC_D,
              inspect.getsource(build), inspect.getsource(_chroot_mounts), inspect.getsource(_copy_boot_files),
              INIT_SCRIPT.read_text(), json.dumps(installed, sort_keys=True)]
    return hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]


def ensure_image(log: Path | None = None) -> tuple[Image, bool]:
    """The cached image for the current inputs, built first if absent; True when it was built now."""
    image = Image(cache_dir() / image_key())
    if image.ready.exists():
        image.ready.touch()
        return image, False
    if os.geteuid() != 0:
        raise ImageError("building the two-node VM image needs root (debootstrap, chroot)")
    image.directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(image.directory.parent / ".build.lock"):
        # Another run may have built it while we waited for the lock.
        if image.ready.exists():
            return image, False
        build(image, log)
        prune(image.directory.parent, keep=image)
    return image, True


def prune(cache: Path, keep: Image) -> list[Path]:
    """Remove the images of other inputs that no run has used for UNUSED_DAYS (their `ready` mtime)."""
    removed = []
    for ready in cache.glob("*/ready"):
        directory = ready.parent
        if directory != keep.directory and time.time() - ready.stat().st_mtime > UNUSED_DAYS * 86400:
            _remove(directory)
            directory.with_name(f"{directory.name}.log").unlink(missing_ok=True)
            removed.append(directory)
    return removed


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(image: Image, log: Path | None = None) -> None:
    """debootstrap + apt in a chroot + the project's venv, then an ext4 disk, kernel and initrd beside it."""
    for tool in ("debootstrap", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is missing: apt-get install debootstrap e2fsprogs (or `make bootstrap`)")
    work = image.directory.with_name(f"{image.directory.name}.build-{os.getpid()}")
    _remove(work)
    rootfs = work / "rootfs"
    work.mkdir(parents=True)
    out = open(log or image.directory.with_name(f"{image.directory.name}.log"), "w")  # noqa: SIM115 - closed below
    try:
        def step(*argv: str | Path, chroot: bool = False) -> None:
            command = ["chroot", str(rootfs), *map(str, argv)] if chroot else list(map(str, argv))
            out.write(f"+ {' '.join(command)}\n")
            out.flush()
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive",
                   "HOME": "/root"}
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
            if result.returncode != 0:
                out.flush()
                tail = Path(out.name).read_text(errors="replace").splitlines()[-15:]
                raise ImageError(f"`{' '.join(command)}` exited {result.returncode}; {out.name} ends with:\n"
                                 + "\n".join(tail))

        started = time.monotonic()
        step("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, rootfs,
             debian_mirror())
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        with _chroot_mounts(rootfs):
            step("apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES, chroot=True)
            step("apt-get", "clean", chroot=True)
            # The editable install reads the tree at SRC once, to learn the package and its entry points.
            _copy_tree(REPO, rootfs / SRC.relative_to("/"))
            step("python3", "-m", "venv", "--system-site-packages", VENV, chroot=True)
            step(VENV / "bin/pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-e", SRC, chroot=True)
        policy.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        init = rootfs / "sbin/numavm-init"
        shutil.copy(INIT_SCRIPT, init)
        init.chmod(0o755)
        (rootfs / "etc/hostname").write_text("numavm\n")
        work_image = Image(work)
        _copy_boot_files(rootfs, work_image)
        used = int(subprocess.run(["du", "-sb", str(rootfs)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        size_mib = (used + HEADROOM) // (1024 * 1024) + 1
        step("mkfs.ext4", "-q", "-F", "-L", "numavm", "-d", rootfs, work_image.disk, f"{size_mib}M")
        shutil.rmtree(rootfs)
        out.write(f"built in {time.monotonic() - started:.0f} s\n")
        out.close()
        work_image.ready.write_text(f"{image_key()}\n")
        os.replace(work, image.directory)
    except BaseException:
        out.close()
        _remove(work)
        raise


def _remove(path: Path) -> None:
    """rmtree, refusing while anything is mounted below ``path`` (the chroot's /dev is the host's)."""
    mounted = [point for point in mount_points() if path in point.parents]
    if mounted:
        raise ImageError(f"not removing {path}: {', '.join(map(str, mounted))} still mounted")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _chroot_mounts(rootfs: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside the chroot (postinst scripts read them), unmounted afterwards."""
    mounted: list[Path] = []
    try:
        for fstype, name in (("proc", "proc"), ("sysfs", "sys")):
            subprocess.run(["mount", "-t", fstype, fstype, str(rootfs / name)], check=True)
            mounted.append(rootfs / name)
        subprocess.run(["mount", "--rbind", "/dev", str(rootfs / "dev")], check=True)
        subprocess.run(["mount", "--make-rslave", str(rootfs / "dev")], check=True)
        mounted.append(rootfs / "dev")
        yield
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", str(path)], check=False)


def _copy_tree(source: Path, target: Path) -> None:
    """The project tree without what git ignores or keeps for itself (venv, caches, .git)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SKIP), dirs_exist_ok=True)


SKIP = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache",
        ".hypothesis", "build", ".sandbox")


def _copy_boot_files(rootfs: Path, image: Image) -> None:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageError(f"no kernel or initrd in {rootfs / 'boot'}: did linux-image-cloud-amd64 install?")
    shutil.copy(kernels[-1], image.kernel)
    shutil.copy(initrds[-1], image.initrd)


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The first Debian archive URI in apt's sources that serves SUITE's main (not the security archive)."""
    files: list[Path] = []
    for path in sources:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources"))
        elif path.is_file():
            files.append(path)
    for file in files:
        for uri, suites in _entries(file.read_text()):
            if SUITE in suites and "security" not in uri:
                return uri
    raise ImageError(f"no apt source serves Debian {SUITE} in {', '.join(map(str, sources))}")


def _entries(text: str) -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) of one-line (`deb URI SUITE COMPONENTS`) and deb822 (`URIs:`/`Suites:`) sources."""
    for line in text.splitlines():
        match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if match:
            yield match.group(1), [match.group(2)]
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
        if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
            for uri in fields.get("URIs", "").split():
                yield uri, fields.get("Suites", "").split()
