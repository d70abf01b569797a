"""A private libvirtd + QEMU on emulated dmemfs, in its own mount namespace, for tests and the demo.

`Sandbox(root, per_node).up()` installs what is missing, bind-mounts directories under `root` over libvirt's
and dmem-libvirt's host paths inside a private mount and UTS namespace, emulates dmemfs there, mounts
its own hugetlbfs (2 MiB and 1 GiB pages, listed in qemu.conf's hugetlbfs_mount: the pools behind them
are the machine's, real and host-global), installs the hook and starts virtlogd + libvirtd.  `down()`
stops every process of that namespace by pid and removes `root`; the machine's own libvirt, mounts and
configuration are never touched.  Two sandboxes are two hosts that can migrate guests to each other
(see HOSTS).  CLI: `python tests/sandbox.py`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import grp
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from dmem_libvirt import procmaps
from dmem_libvirt.config import HostConfig
from dmem_libvirt.cpulist import parse_cpulist
from dmem_libvirt.errors import DmemError
from dmem_libvirt.units import GiB, KiB, MiB, format_page_size, format_size, parse_size

APT_PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86",
                "libxml2-utils", "util-linux")
# What libvirtd, virtlogd and dmem-libvirt read or write; each gets a private copy under the sandbox root.
# /run/dmem-libvirt too: the hook asks the hook server there, and a server must serve its own sandbox only.
PRIVATE_DIRS = tuple(map(Path, ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                                  "/var/cache/libvirt", "/etc/dmem-libvirt", "/var/lib/dmem-libvirt",
                                  "/run/dmem-libvirt")))
# Masked so libvirtd cannot reach the machine's systemd-machined or polkit over D-Bus.
DBUS_DIR = Path("/run/dbus")
KVM_DEVICE = Path("/dev/kvm")
LIBVIRTD = Path("/usr/sbin/libvirtd")
VIRTLOGD = Path("/usr/sbin/virtlogd")
QEMU_USER = "libvirt-qemu"
QEMU_GROUP = "libvirt-qemu"
KVM_GROUP = "kvm"
DEFAULT_PAGE_SIZE = 2 * MiB
# dmemfs page sizes (the RFC's pagesize= mount option).
PAGE_SIZES = (4 * KiB, 2 * MiB, GiB)
HOST_NAME_MAX = 64
# Each sandbox's libvirtd gives incoming migrations ports of its own block above libvirt's default range:
# daemons sharing one (two migrations crossing, other sandboxes on the machine) picked the same free port
# at once and one QEMU failed with "Address already in use" (measured).
MIGRATION_PORTS = range(49152, 65152, 16)
DEFAULT_ROOT = Path("/run/dmem-sandbox")
DEFAULT_PER_NODE = 2 * GiB
HUGE_PAGE_SIZES = (2 * MiB, GiB)
# What every sandbox config says besides its backend.  orphan_grace keeps its default: a reservation made by
# a concurrent `prepare` belongs to a guest whose QEMU does not exist yet, and must not be collected.
_SHARED_CONFIG = ("[libvirt]\n"
                  'qemu_conf = "/etc/libvirt/qemu.conf"\n'
                  'run_dir = "/run/libvirt/qemu"\n'
                  "[state]\n"
                  'dir = "/var/lib/dmem-libvirt"\n')
STATE_FILE = "sandbox.json"
# Marks a directory as a sandbox root: only such a directory is ever removed.
MARKER = ".dmem-sandbox"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
INSIDE_URI = "qemu:///system"
# How virsh shows a hook's failure: the hook's own stderr line follows libvirt's prefix.
HOOK_FAILED = re.compile(r"Hook script execution failed: .* unexpected exit status 1: (.*)$", re.M)
PR_SET_CHILD_SUBREAPER = 36
# Runs argv (a daemon that forks into the background) as the child of a process that reaps every orphan
# below it at once, then returns argv's status.  QEMU, daemonized by libvirtd, is such an orphan: without
# this it is reparented to the machine's init, and libvirt's destroy waits until QEMU's zombie is reaped
# (it polls kill(pid, 0) every 200 ms).  systemd reaps on SIGCHLD; the init of the machines the tests run
# on reaps only on whole-second ticks, 1-2 s late (measured), which would dominate every destroy.
REAPER = f"""\
import ctypes, os, sys
status_r, status_w = os.pipe()
if os.fork():
    os.close(status_w)
    sys.exit(int(os.read(status_r, 16) or b"1"))
os.close(status_r)
os.setsid()
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_CHILD_SUBREAPER}, 1, 0, 0, 0) != 0:
    sys.exit("cannot become a child subreaper: " + os.strerror(ctypes.get_errno()))
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.write(status_w, str(status).encode())
os.close(status_w)
if status:
    sys.exit(status)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""
REPO = Path(__file__).resolve().parent.parent
HOSTS = """\
two hosts on one machine:
  Each sandbox is a host of its own: its own mount and UTS namespace (host name = the root's
  directory name), libvirtd host_uuid, /run/libvirt, state directory, configuration and emulated
  dmem pool (--per-node, --used by others, --page-size).  libvirt refuses to migrate a guest to a
  daemon with its own host name or host UUID; these differ, so guests migrate between sandboxes:

    python tests/sandbox.py --root /run/dmem-a up
    python tests/sandbox.py --root /run/dmem-b --per-node 1G --used 256M up
    python tests/sandbox.py --root /run/dmem-a run virsh migrate --live --persistent [--p2p] GUEST \\
        'qemu+unix:///system?socket=/run/dmem-b/run/libvirt/libvirt-sock' --migrateuri tcp://127.0.0.1

  The daemons reach each other over their UNIX sockets (a root's files are visible from every
  namespace).  Write qemu+unix://, not qemu://: with --p2p the source's libvirtd would take a plain
  qemu:/// URI for itself.  libvirtd --listen with listen_tcp also works (qemu+tcp://127.0.0.1:PORT)
  but opens an unauthenticated port to every local user, so the sandbox does not listen.  The
  migration stream goes over loopback TCP: libvirt 9.0 refuses a loopback migration_address in
  qemu.conf, and the destination's host name does not resolve, hence --migrateuri; each sandbox's
  libvirtd gives it a port of its own block (migration_port_min/max in its qemu.conf).
"""


class SandboxError(DmemError):
    """The sandbox cannot be set up, reached or torn down."""


@dataclass(frozen=True)
class SandboxState:
    """What `down()` (or the next `up()` after a crash) needs to find everything the sandbox started."""

    holder: int
    mntns: str
    owner: int | None
    owner_start: int | None
    # The holder's start time: the namespace's identity once the holder is gone is nothing we can check.
    holder_start: int | None = None

    def dump(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> SandboxState | None:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["holder"]), str(raw["mntns"]), raw["owner"], raw["owner_start"],
                       raw.get("holder_start"))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class Sandbox:
    """One private libvirtd; `run`/`virsh`/`dmem` execute inside its mount namespace."""

    def __init__(self, root: Path, per_node: int = DEFAULT_PER_NODE, hook: bool = True, *,
                 host: HostConfig | None = None, detached: bool = False, used: int = 0,
                 page_size: int = DEFAULT_PAGE_SIZE, hostname: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.per_node = per_node
        # The tmpfs under the emulated pool is sized for this: set_pool can shrink the pool, not grow it.
        self.capacity = per_node
        self.used = used
        self.page_size = page_size
        self.hook = hook
        # Its own UTS namespace and host UUID: libvirt refuses to migrate a guest to a daemon whose
        # host name or host UUID is its own.
        self.hostname = hostname or self.root.name[:HOST_NAME_MAX]
        self.host_uuid = str(uuid.uuid4())
        self.host = host or HostConfig()
        # A detached sandbox (the CLI's `up`) outlives its creator and is removed only by `down`.
        self.detached = detached
        self.domain_type = "qemu"
        self._state: SandboxState | None = None
        self._holder_proc: subprocess.Popen[bytes] | None = None

    # ---- paths ------------------------------------------------------------------------------------

    def private(self, path: Path | str) -> Path:
        """Where the private copy of host path ``path`` lives, seen from outside the namespace."""
        return self.root / Path(path).relative_to("/")

    @property
    def dmem_mount(self) -> Path:
        return self.root / "dmem"

    @property
    def debugfs(self) -> Path:
        return self.root / "debugfs" / "dmem"

    @property
    def hugetlbfs_mounts(self) -> dict[int, Path]:
        """Page size -> this sandbox's hugetlbfs mount of that size."""
        return {size: self.root / f"hugepages-{format_page_size(size).replace(' ', '')}" for size in HUGE_PAGE_SIZES}

    @property
    def config_file(self) -> Path:
        """The dmem-libvirt config the hook reads (/etc/dmem-libvirt/config.toml inside), seen from outside."""
        return self.private("/etc/dmem-libvirt") / "config.toml"

    def use_config(self, text: str) -> None:
        """Replace the dmem-libvirt config inside (the hook reads it on every call: no reload needed)."""
        self.config_file.write_text(text)

    def emulated_config(self) -> str:
        return ("# dmem-libvirt sandbox: emulated dmemfs\n"
                "[dmemfs]\n"
                "emulate = true\n"
                f'mount = "{self.dmem_mount}"\n'
                f'debugfs = "{self.debugfs}"\n'
                f'page_size = "{self.page_size // KiB}K"\n' + _SHARED_CONFIG)

    def hugetlbfs_config(self, limit: dict[int, int] | None = None) -> str:
        """The hugetlbfs backend on the sandbox's mounts, growing each node's pool up to ``limit``."""
        text = ("# dmem-libvirt sandbox: hugetlbfs on the machine's real pools\n"
                '[backend]\nname = "hugetlbfs"\n' + _SHARED_CONFIG)
        if limit:
            text += "[hugetlbfs.limit]\n" + "".join(f"{node} = {size}\n" for node, size in sorted(limit.items()))
        return text

    @property
    def uri(self) -> str:
        """A libvirt URI that reaches this daemon from inside and outside the namespace."""
        return f"qemu:///system?socket={self.private('/run/libvirt/libvirt-sock')}"

    @property
    def migration_port(self) -> int:
        """The first of the 16 ports this sandbox's libvirtd gives incoming migration streams."""
        return MIGRATION_PORTS[zlib.crc32(str(self.root).encode()) % len(MIGRATION_PORTS)]

    @property
    def migration_uri(self) -> str:
        """The URI another sandbox's virsh or libvirtd (``--p2p``) reaches this daemon by, over its socket.

        The explicit ``+unix`` matters: libvirtd's own QEMU driver claims a plain ``qemu:///system``, so a
        peer-to-peer migration to it would be a migration to the source itself (measured on 9.0).
        """
        return self.uri.replace("qemu:", "qemu+unix:", 1)

    @property
    def holder(self) -> int:
        if self._state is None:
            raise SandboxError(f"the sandbox at {self.root} is not up")
        return self._state.holder

    def inside(self, path: Path | str) -> Path:
        """``path`` as the namespace sees it, readable from outside (through the holder's root)."""
        return self.host.proc / str(self.holder) / "root" / Path(path).relative_to("/")

    def nodes(self) -> list[int]:
        online = self.host.sysfs / "devices" / "system" / "node" / "online"
        try:
            return sorted(parse_cpulist(online.read_text()))
        except (OSError, ValueError) as err:
            raise SandboxError(f"cannot read the host's NUMA nodes from {online}: {err}") from None

    # ---- running things inside ----------------------------------------------------------------------

    def run(self, argv: Sequence[str | os.PathLike[str]], check: bool = True, input: str | None = None,
            timeout: float | None = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace; with ``check`` a failure raises SandboxError with its stderr."""
        env = dict(os.environ)
        env["LIBVIRT_DEFAULT_URI"] = INSIDE_URI
        # The product must read the private default config, as the hook does.
        env.pop("DMEM_LIBVIRT_CONFIG", None)
        command = ["nsenter", f"--target={self.holder}", "--mount", "--uts", "--", *map(str, argv)]
        result = subprocess.run(command, input=input, capture_output=True, text=True, env=env,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise SandboxError(f"`{' '.join(map(str, argv))}` exited {result.returncode}: "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def start_hook_server(self) -> subprocess.Popen[bytes]:
        """`dmem-libvirt hook-server` in the namespace (stopped with the sandbox, as every process in it)."""
        socket = self.private("/run/dmem-libvirt") / "hook.sock"
        env = {key: value for key, value in os.environ.items() if key != "DMEM_LIBVIRT_CONFIG"}
        server = subprocess.Popen(["nsenter", f"--target={self.holder}", "--mount", "--uts", "--",
                                   str(dmem_command()), "hook-server"], env=env, cwd="/",
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.is_socket():
            if server.poll() is not None:
                assert server.stderr is not None
                raise SandboxError(f"the hook server exited {server.returncode}: {server.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise SandboxError(f"the hook server did not listen on {socket} within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        return server

    def virsh(self, *args: str, check: bool = True,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(["virsh", "-q", "-c", INSIDE_URI, *args], check=check, input=input)

    def migrate(self, name: str, destination: Sandbox, *flags: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """`virsh migrate FLAGS name DEST` from this sandbox to ``destination`` (another Sandbox).

        The migration stream goes over loopback TCP on a port the destination's libvirtd allocates:
        libvirt refuses a loopback ``migration_address``/``migration_host`` in qemu.conf, and the
        destination's host name (its UTS namespace's) resolves to nothing.
        """
        return self.run(["virsh", "-q", "-c", INSIDE_URI, "migrate", *flags, name, destination.migration_uri,
                         "--migrateuri", "tcp://127.0.0.1"], check=check)

    def dmem(self, *args: str, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run([dmem_command(), *args], check=check, input=input)

    def define(self, xml: str) -> None:
        """Define a domain from XML text (written to the private /run/libvirt, as virsh needs a file)."""
        name = f"define-{time.monotonic_ns()}.xml"
        self.private("/run/libvirt").joinpath(name).write_text(xml)
        try:
            self.virsh("define", f"/run/libvirt/{name}")
        finally:
            self.private("/run/libvirt").joinpath(name).unlink(missing_ok=True)

    def install_hook(self) -> None:
        """`dmem-libvirt install-hook` inside: writes the private hooks dir and SIGHUPs libvirtd."""
        self.dmem("install-hook")

    def remove_hook(self) -> None:
        self.dmem("uninstall-hook")

    def qemu_pid(self, name: str) -> int:
        """The pid of the running guest's QEMU (libvirt's pid file in the private /run/libvirt/qemu)."""
        path = self.private(f"/run/libvirt/qemu/{name}.pid")
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            raise SandboxError(f"guest {name} has no QEMU pid file {path}: is it running?") from None

    def qemu_cmdline(self, name: str) -> list[str]:
        return procmaps.cmdline(self.host.proc, self.qemu_pid(name))

    def libvirtd_pid(self) -> int | None:
        return _pid_from(self.private("/run/libvirt/libvirtd.pid"), self.host.proc, "libvirtd")

    def reload_libvirtd(self) -> None:
        """SIGHUP: libvirtd rescans its hooks (and reloads its configuration)."""
        pid = self.libvirtd_pid()
        if pid is None:
            raise SandboxError("libvirtd is not running in the sandbox")
        os.kill(pid, signal.SIGHUP)

    def restart_libvirtd(self) -> None:
        """Stop libvirtd (running guests keep running) and start it again; it reconnects to them."""
        pid = self.libvirtd_pid()
        if pid is not None:
            _terminate([pid], self.host.proc, STOP_TIMEOUT)
        self._start_libvirtd()

    # ---- up -----------------------------------------------------------------------------------------

    def up(self) -> Sandbox:
        """Bring the sandbox up (cleaning a stale one at the same root first); returns self."""
        if os.geteuid() != 0:
            raise SandboxError("the sandbox needs root: it mounts, creates users and starts libvirtd "
                               "(run the tests or the demo as root)")
        ensure_packages()
        ensure_qemu_user()
        for path in (LIBVIRTD, VIRTLOGD):
            if not path.exists():
                raise SandboxError(f"{path} is missing: apt-get install {' '.join(APT_PACKAGES)}")
        reap_stale(self.root.parent, self.host)
        self.down()
        try:
            self._layout()
            self._enter_namespace()
            self.run(["hostname", self.hostname])
            self._mount()
            self.domain_type = self._choose_accel()
            self._write_configs()
            self.run([VIRTLOGD, "-d", "-p", "/run/libvirt/virtlogd.pid"])
            self._start_libvirtd()
            # As an administrator would: install-hook reloads the running daemon.
            if self.hook:
                self.install_hook()
        except BaseException:
            self.down()
            raise
        if not self.detached:
            atexit.register(self.down)
        return self

    def _layout(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        (self.root / MARKER).touch()
        self.root.chmod(0o755)  # the QEMU user walks through it to reach <root>/dmem
        for path in PRIVATE_DIRS:
            self.private(path).mkdir(mode=0o755, parents=True, exist_ok=True)
            # A bind mount needs its mount point; these are the directories the Debian packages create.
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.dmem_mount.mkdir(mode=0o755, exist_ok=True)
        for mount in self.hugetlbfs_mounts.values():
            mount.mkdir(mode=0o755, exist_ok=True)
        (self.root / "dev").mkdir(mode=0o755, exist_ok=True)
        # Client-side defaults shipped with libvirt (libvirt.conf, libvirt-admin.conf); the daemons'
        # configuration is written fresh, never copied from the machine's own libvirt.
        for conf in Path("/etc/libvirt").glob("*.conf"):
            if conf.is_file() and conf.name in ("libvirt.conf", "libvirt-admin.conf"):
                shutil.copy2(conf, self.private(conf))
        self.set_pool(self.per_node, self.used, self.page_size)

    def _enter_namespace(self) -> None:
        own_ns = os.readlink(self.host.proc / "self" / "ns" / "mnt")
        self._holder_proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        pid = self._holder_proc.pid
        deadline = time.monotonic() + 5
        while True:
            try:
                ns = os.readlink(self.host.proc / str(pid) / "ns" / "mnt")
            except OSError:
                ns = own_ns
            if ns != own_ns:
                break
            if self._holder_proc.poll() is not None or time.monotonic() > deadline:
                stderr = self._holder_proc.stderr.read().decode() if self._holder_proc.stderr else ""
                raise SandboxError(f"unshare --mount failed: {stderr.strip() or 'no new namespace'}")
            time.sleep(0.01)
        owner = None if self.detached else os.getpid()
        owner_start = None if owner is None else procmaps.start_ticks(self.host.proc, owner)
        self._state = SandboxState(pid, ns, owner, owner_start, procmaps.start_ticks(self.host.proc, pid))
        (self.root / STATE_FILE).write_text(self._state.dump())

    def _mount(self) -> None:
        for path in PRIVATE_DIRS:
            self.run(["mount", "--bind", self.private(path), path])
        if DBUS_DIR.is_dir():
            self.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "sandbox-dbus", DBUS_DIR])
        size = self.capacity * len(self.nodes()) + 64 * MiB
        self.run(["mount", "-t", "tmpfs", "-o", f"size={size // KiB}k,mode=0755", "sandbox-dmem",
                  self.dmem_mount])
        self.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "sandbox-dev", self.root / "dev"])
        for size, mount in self.hugetlbfs_mounts.items():
            option = format_page_size(size).replace(" ", "").replace("iB", "")
            self.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={option},mode=0755", "sandbox-huge", mount])

    def _choose_accel(self) -> str:
        """KVM when the QEMU user can open a private /dev/kvm; TCG (type='qemu') otherwise."""
        if not KVM_DEVICE.exists():
            return "qemu"
        # /dev/kvm is root-only (0600) on these machines and QEMU runs as libvirt-qemu (measured:
        # Permission denied).  A private node of the same device, group kvm and 0660, bind-mounted over
        # /dev/kvm inside the namespace only, lets it in without changing the machine's device.
        device = KVM_DEVICE.stat().st_rdev
        node = self.root / "dev" / "kvm"
        self.run(["mknod", "-m", "0660", node, "c", str(os.major(device)), str(os.minor(device))])
        self.run(["chgrp", KVM_GROUP, node])
        self.run(["mount", "--bind", node, KVM_DEVICE])
        probe = self.run(["setpriv", f"--reuid={QEMU_USER}", f"--regid={QEMU_GROUP}", "--init-groups",
                          "test", "-r", KVM_DEVICE, "-a", "-w", KVM_DEVICE], check=False)
        return "kvm" if probe.returncode == 0 else "qemu"

    def set_pool(self, per_node: int, used: int = 0, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        """(Re)write the emulated dmemfs: ``per_node`` bytes per node of ``page_size`` pages, of which ``used``
        are taken by something the ledger does not know (another tenant); the hook reads it on its next call.

        Only while no guest of this sandbox holds pages: the pinned ones would be forgotten.
        """
        if page_size not in PAGE_SIZES:
            raise SandboxError(f"dmemfs has no {format_size(page_size)} pages; it has "
                               f"{', '.join(map(format_size, PAGE_SIZES))}")
        if per_node > self.capacity:
            raise SandboxError(f"the sandbox's dmem mount holds {format_size(self.capacity)} per node, "
                               f"not {format_size(per_node)}")
        if per_node % page_size or used % page_size or not 0 <= used <= per_node:
            raise SandboxError(f"a pool of {format_size(per_node)} with {format_size(used)} used is not "
                               f"a whole number of {format_size(page_size)} pages")
        self.per_node, self.used, self.page_size = per_node, used, page_size
        pages, free = per_node // page_size, (per_node - used) // page_size
        nodes = self.nodes()
        values = {
            "dpage_shift": page_size.bit_length() - 1,
            "total_dpages": pages * len(nodes),
            "free_dpages": free * len(nodes),
            "region_num": len(nodes),
            # The kernel counts registered memory in 4 KiB pages.
            "registered_pages": (per_node >> 12) * len(nodes),
            "unaligned_pages": 0,
        }
        self.debugfs.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            (self.debugfs / name).write_text(f"{value}\n")
        for node in nodes:
            (self.debugfs / f"node{node}").mkdir(exist_ok=True)
            (self.debugfs / f"node{node}" / "total_dpages").write_text(f"{pages}\n")
            (self.debugfs / f"node{node}" / "free_dpages").write_text(f"{free}\n")
        self.use_config(self.emulated_config())

    def _write_configs(self) -> None:
        etc = self.private("/etc/libvirt")
        (etc / "libvirtd.conf").write_text(
            "# dmem-libvirt sandbox: root-only UNIX socket, no polkit (D-Bus is masked)\n"
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
            f'host_uuid = "{self.host_uuid}"\n')
        (etc / "virtlogd.conf").write_text('log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n')
        huge_mounts = ", ".join(f'"{mount}"' for mount in self.hugetlbfs_mounts.values())
        (etc / "qemu.conf").write_text(
            "# dmem-libvirt sandbox\n"
            f'memory_backing_dir = "{self.dmem_mount}"\n'
            f"hugetlbfs_mount = [ {huge_mounts} ]\n"
            'security_driver = "none"\n'
            "cgroup_controllers = [ ]\n"
            # QEMU stays in the sandbox's namespace, so the sandbox finds and stops it by namespace and
            # /dev/kvm is the private node above (libvirt's own /dev namespace would copy the host's).
            "namespaces = [ ]\n"
            f"migration_port_min = {self.migration_port}\nmigration_port_max = {self.migration_port + 15}\n"
            f'user = "{QEMU_USER}"\ngroup = "{QEMU_GROUP}"\n')

    def _start_libvirtd(self) -> None:
        # libvirt drops its cached QEMU capabilities when the host CPUID it reads differs from the cached
        # one, and under nested KVM that depends on the CPU the daemon happens to run on (measured: half
        # the restarts re-probed QEMU for 8 s).  One CPU keeps the cache valid; libvirt resets each QEMU's
        # affinity to every host CPU, so guests are not confined by this.
        cpu = min(os.sched_getaffinity(0))
        self.run([sys.executable, "-I", "-S", "-c", REAPER,
                  "taskset", "--cpu-list", str(cpu), LIBVIRTD, "-d", "-p", "/run/libvirt/libvirtd.pid"])
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            probe = self.run(["virsh", "-c", INSIDE_URI, "version"], check=False, timeout=START_TIMEOUT)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = self.private("/var/log/libvirt/libvirtd.log")
                tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else ["(no log)"]
                raise SandboxError(f"libvirtd did not answer within {START_TIMEOUT:.0f} s "
                                   f"({probe.stderr.strip()}); {log} ends with: " + " | ".join(tail))
            time.sleep(0.1)

    # ---- down ---------------------------------------------------------------------------------------

    def down(self) -> None:
        """Destroy the guests, stop every process of the namespace by pid, remove the root directory."""
        state = self._state or SandboxState.load(self.root / STATE_FILE)
        if state is not None:
            self._state = state
            if _namespace_members(state.mntns, self.host.proc):
                with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
                    self._destroy_guests()
            teardown(self.root, state, self.host)
        if self._holder_proc is not None:
            self._holder_proc.kill()
            self._holder_proc.wait()
            if self._holder_proc.stderr:
                self._holder_proc.stderr.close()
            self._holder_proc = None
        self._state = None
        remove_root(self.root, self.host)
        atexit.unregister(self.down)

    def _destroy_guests(self) -> None:
        if self.libvirtd_pid() is None:
            return
        names = self.virsh("list", "--name").stdout.split()
        for name in names:
            self.virsh("destroy", name, check=False)


# ---- module-level helpers (also used on stale sandboxes found after a crash) ------------------------

def dmem_command() -> Path:
    """The `dmem-libvirt` command of this interpreter's installation (the venv's)."""
    return Path(sys.executable).parent / "dmem-libvirt"


def ensure_packages() -> None:
    """apt-get install the Debian packages that are missing; nothing (and no network) when all are there."""
    missing = [name for name in APT_PACKAGES if not _dpkg_installed(name)]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SandboxError(f"`{' '.join(argv)}` failed: {result.stderr.strip()[-400:]}")


def _dpkg_installed(name: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", name],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and result.stdout.startswith("ii")


def ensure_qemu_user() -> None:
    """The `kvm` and `libvirt-qemu` groups and the `libvirt-qemu` user (in kvm), as Debian's
    libvirt-daemon-system creates them: libvirtd's QEMU driver refuses to start without the user."""
    for group in (KVM_GROUP, QEMU_GROUP):
        if not _group_exists(group):
            _run_tolerating_exists(["groupadd", "--system", group])
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        _run_tolerating_exists(["useradd", "--system", "--gid", QEMU_GROUP, "--groups", KVM_GROUP,
                                "--home-dir", "/var/lib/libvirt", "--no-create-home",
                                "--shell", "/usr/sbin/nologin", "--comment", "Libvirt Qemu", QEMU_USER])
    if QEMU_USER not in grp.getgrnam(KVM_GROUP).gr_mem:
        subprocess.run(["usermod", "--append", "--groups", KVM_GROUP, QEMU_USER], check=True)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run_tolerating_exists(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    # 9: the name was created meanwhile (another sandbox coming up at the same time).
    if result.returncode not in (0, 9):
        raise SandboxError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def _pid_from(pid_file: Path, proc: Path, comm: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        name = (proc / str(pid) / "comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if name == comm and procmaps.alive(proc, pid) else None


def _namespace_members(mntns: str, proc: Path) -> list[int]:
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "mnt") == mntns and procmaps.alive(proc, int(entry.name)):
                members.append(int(entry.name))
        except OSError:
            continue
    return members


def _in_namespace(pid: int, mntns: str, proc: Path) -> bool:
    try:
        return os.readlink(proc / str(pid) / "ns" / "mnt") == mntns
    except OSError:
        return False


def _terminate(pids: Sequence[int], proc: Path, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left, and wait for it to go."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        living = [pid for pid in pids if procmaps.alive(proc, pid)]
        for pid in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(procmaps.alive(proc, pid) for pid in living) and time.monotonic() < deadline:
            time.sleep(0.02)


def teardown(root: Path, state: SandboxState, host: HostConfig) -> None:
    """Stop the daemons, then any QEMU, then every other process of the namespace (the holder last).

    Without its holder, a sandbox's namespace is identified by its inode number only, which the kernel
    reuses once the namespace is gone: then only the processes of this root's pid files are stopped, never
    "every process of that namespace", which may by then be another, running sandbox's.
    """
    run = root / "run" / "libvirt"
    daemons = [pid for pid in (_pid_from(run / "libvirtd.pid", host.proc, "libvirtd"),
                               _pid_from(run / "virtlogd.pid", host.proc, "virtlogd")) if pid is not None]
    qemus = []
    for pid_file in (run / "qemu").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            qemus.append(int(pid_file.read_text().strip()))
    for pids in (daemons, qemus):
        _terminate([pid for pid in pids if _in_namespace(pid, state.mntns, host.proc)], host.proc, STOP_TIMEOUT)
    holder_alive = (state.holder_start is not None and procmaps.alive(host.proc, state.holder)
                    and procmaps.start_ticks(host.proc, state.holder) == state.holder_start
                    and _in_namespace(state.holder, state.mntns, host.proc))
    if not holder_alive:
        return
    others = [pid for pid in _namespace_members(state.mntns, host.proc) if pid != state.holder]
    _terminate(others, host.proc, STOP_TIMEOUT)
    _terminate([pid for pid in (state.holder,) if pid in _namespace_members(state.mntns, host.proc)],
               host.proc, STOP_TIMEOUT)
    left = _namespace_members(state.mntns, host.proc)
    if left:
        raise SandboxError(f"processes {left} of the sandbox at {root} survived SIGKILL")


def remove_root(root: Path, host: HostConfig) -> None:
    """Remove the sandbox directory, refusing while anything below it is mounted in this namespace."""
    if not root.exists():
        return
    if not (root / MARKER).exists():
        if any(root.iterdir()):
            raise SandboxError(f"{root} is not empty and is not a sandbox directory; not removing it")
        root.rmdir()
        return
    mounted = [point for point in mount_points(host) if point == root or root in point.parents]
    if mounted:
        raise SandboxError(f"not removing {root}: still mounted at {', '.join(map(str, mounted))}")
    shutil.rmtree(root)


def mount_points(host: HostConfig | None = None) -> list[Path]:
    """Mount points of the calling process's mount namespace (field 5 of mountinfo, unescaped)."""
    proc = (host or HostConfig()).proc
    points = []
    for line in (proc / "self" / "mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.append(Path(field.encode().decode("unicode_escape")))
    return points


def reap_stale(parent: Path, host: HostConfig) -> list[Path]:
    """Tear down sandboxes under ``parent`` whose owning process died without `down()` (a crashed run)."""
    reaped = []
    for state_file in sorted(parent.glob(f"*/{STATE_FILE}")):
        state = SandboxState.load(state_file)
        if state is None or state.owner is None:
            continue
        if procmaps.alive(host.proc, state.owner) and procmaps.start_ticks(host.proc, state.owner) == state.owner_start:
            continue
        teardown(state_file.parent, state, host)
        remove_root(state_file.parent, host)
        reaped.append(state_file.parent)
    return reaped


# ---- guest XML -----------------------------------------------------------------------------------------

def guest_xml(name: str, memory: int = 256 * MiB, *, domain_type: str = "qemu",
              cells: Sequence[int] = (), file_backed: bool = False, vcpus: int = 1,
              console: bool = False, hugepages: int | None = None) -> str:
    """A diskless guest that boots into SeaBIOS and waits: enough for QEMU to map its RAM.

    ``cells`` are guest NUMA cell sizes in bytes (their sum must be ``memory``); ``hugepages``: libvirt's own
    ``<hugepages>`` of that page size, as an operator writes it without dmem-libvirt; no ``<cpu>`` model,
    because host-model/host-passthrough abort QEMU under nested KVM (measured).
    """
    if cells and sum(cells) != memory:
        raise ValueError(f"cells add up to {format_size(sum(cells))}, memory is {format_size(memory)}")
    vcpus = max(vcpus, len(cells))
    lines = [f"<domain type={quoteattr(domain_type)}>",
             f"  <name>{escape(name)}</name>",
             f"  <memory unit='KiB'>{memory // KiB}</memory>",
             f"  <vcpu>{vcpus}</vcpu>"]
    if file_backed:
        lines += ["  <memoryBacking>", "    <source type='file'/>", "    <access mode='shared'/>",
                  "  </memoryBacking>"]
    elif hugepages:
        lines += ["  <memoryBacking>", "    <hugepages>", f"      <page size='{hugepages // KiB}' unit='KiB'/>",
                  "    </hugepages>", "  </memoryBacking>"]
    lines += ["  <os>", "    <type arch='x86_64' machine='pc'>hvm</type>", "  </os>"]
    if cells:
        per_cell = [list(range(i, vcpus, len(cells))) for i in range(len(cells))]
        lines += ["  <cpu>", "    <numa>"]
        lines += [f"      <cell id='{i}' cpus='{','.join(map(str, cpus))}' "
                  f"memory='{size // KiB}' unit='KiB'/>"
                  for i, (size, cpus) in enumerate(zip(cells, per_cell, strict=True))]
        lines += ["    </numa>", "  </cpu>"]
    lines += ["  <on_crash>destroy</on_crash>", "  <devices>"]
    if console:
        lines += ["    <serial type='pty'/>", "    <console type='pty'/>"]
    lines += ["    <memballoon model='none'/>", "  </devices>", "</domain>", ""]
    return "\n".join(lines)


def with_domain_type(xml: str, domain_type: str, memory: int | None = None) -> str:
    """The example XML with its <domain type=...> set to what this sandbox can run (and its <memory>)."""
    from lxml import etree

    tree = etree.fromstring(xml.encode())
    tree.set("type", domain_type)
    element = tree.find("memory")
    if memory is not None and element is not None:
        element.set("unit", "KiB")
        element.text = str(memory // KiB)
    return etree.tostring(tree, encoding="unicode") + "\n"


# ---- demo and CLI ------------------------------------------------------------------------------------

def memory_arguments(argv: Sequence[str]) -> list[str]:
    """The `-object memory-backend-*` arguments of a QEMU command line (json or key=value form)."""
    return [value for flag, value in itertools.pairwise(argv)
            if flag == "-object" and "memory-backend" in value]


def demo(root: Path, per_node: int) -> int:
    """Start a guest on emulated dmemfs through the hook, show what happened, show a refusal, clean up."""
    examples = REPO / "examples"
    box = Sandbox(root, per_node)
    started = time.monotonic()
    box.up()
    try:
        print(f"sandbox up in {time.monotonic() - started:.1f} s at {root}: "
              f"{'KVM' if box.domain_type == 'kvm' else 'TCG'}, emulated dmemfs "
              f"{format_size(per_node)} per node on nodes {','.join(map(str, box.nodes()))}")
        node = str(box.nodes()[0])
        box.define(with_domain_type((examples / "guest-small.xml").read_text(), box.domain_type))
        # As big as the whole pool of one node (--per-node), whatever that is.
        box.define(with_domain_type((examples / "guest-oversized.xml").read_text(), box.domain_type, per_node))
        # Both are enabled while the pool is empty, on the same node: each fits it alone.
        _show(box.dmem("enable", "guest-small", "--nodes", node))
        enabled = box.dmem("enable", "guest-oversized", "--nodes", node, check=False)
        _show(enabled)
        _show(box.virsh("start", "guest-small"))
        _show(box.dmem("status"))
        print("QEMU memory arguments:")
        for arg in memory_arguments(box.qemu_cmdline("guest-small")):
            print(f"  -object {arg}")
        # The hook admits or refuses at `prepare begin`, against what guest-small now holds.  (`enable` has
        # refused it already, at define time, when --per-node is not a whole number of dmem pages.)
        refused = box.virsh("start", "guest-oversized", check=False) if enabled.returncode == 0 else enabled
        if refused is not enabled:
            _show(refused)
        if refused.returncode == 0:
            raise SandboxError("guest-oversized started although guest-small leaves too little of its node")
        print(f"(refused: exit {refused.returncode})")
        _show(box.virsh("destroy", "guest-small"))
        _show(box.dmem("status"))
    finally:
        box.down()
    print("sandbox down: nothing left running or mounted")
    return 0


def _show(result: subprocess.CompletedProcess[str]) -> None:
    args = [str(arg) for arg in result.args]
    argv = args[args.index("--") + 1:]  # the command itself, without the nsenter prefix
    if argv[0] == "virsh":
        argv = ["virsh", *argv[4:]]  # without "-q -c qemu:///system"
    print("$ " + " ".join(argv).replace(str(dmem_command()), "dmem-libvirt"))
    text = (result.stdout + result.stderr).rstrip()
    if text:
        print(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/sandbox.py",
                                     description="A private libvirtd + QEMU on emulated dmemfs.", epilog=HOSTS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"sandbox directory ({DEFAULT_ROOT})")
    parser.add_argument("--per-node", type=parse_size, default=DEFAULT_PER_NODE, metavar="SIZE",
                        help="emulated dmem per host node (2G)")
    parser.add_argument("--used", type=parse_size, default=0, metavar="SIZE",
                        help="of which taken by others, not by guests of this sandbox (0)")
    parser.add_argument("--page-size", type=parse_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                        help="dmem page size: 4K, 2M or 1G (2M)")
    parser.add_argument("--no-hook", action="store_true", help="do not install the dmem-libvirt hook")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="bring the sandbox up and leave it running")
    sub.add_parser("down", help="stop everything and remove the sandbox directory")
    run = sub.add_parser("run", help="run a command inside the sandbox (after `up`)")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("demo", help="up, start a guest on emulated dmemfs, show a refusal, down")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args.root, args.per_node)
        box = Sandbox(args.root, args.per_node, hook=not args.no_hook, detached=True, used=args.used,
                      page_size=args.page_size)
        if args.command == "up":
            started = time.monotonic()
            box.up()
            print(f"sandbox {box.hostname} up in {time.monotonic() - started:.1f} s: "
                  f"{'KVM' if box.domain_type == 'kvm' else 'TCG'}; virsh -c '{box.migration_uri}'")
            return 0
        if args.command == "down":
            box.down()
            return 0
        state = SandboxState.load(args.root / STATE_FILE)
        if state is None:
            raise SandboxError(f"no sandbox at {args.root}: run `up` first")
        box._state = state
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if command:
            # `run dmem-libvirt status`: the venv's commands by name, before the machine's.
            search = os.pathsep.join([str(dmem_command().parent), os.environ.get("PATH", os.defpath)])
            command = [shutil.which(command[0], path=search) or command[0], *command[1:]]
        result = box.run(command, check=False, timeout=None)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    except DmemError as err:
        print(err.line(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
