"""The hook as libvirt runs it: argv, domain XML on stdin, exit status and one stderr line.

Every test drives `hook.main` in-process against a fake host (tests/fakehost.py) with the emulated dmemfs
backend: a real tmpfs mounted as the dmemfs mount, an emulated debugfs whose counters move on pin and
unpin, a run dir with libvirt-style status and pid files, and a fake /proc in which "QEMU" processes map
files.  Domain XML always comes from the real define-time rewrite, so the metadata is genuine.
`Rig` is the shared harness; tests/test_lifecycle.py and tests/test_hook_race.py use it too.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid as uuid_module
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from fakehost import FakeNode, make_host
from lxml import etree

from dmem_libvirt import define, hook
from dmem_libvirt.config import Config, load
from dmem_libvirt.errors import DmemError
from dmem_libvirt.ledger import Ledger, Reservation
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import MiB

PAGE = 2 * MiB
QEMU_UID = 64055
QEMU_GID = 64055
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Call:
    """What libvirt sees of one hook run."""

    code: int
    stdout: str
    stderr: str


def guest_xml(name: str, cells: Sequence[int] | None = None, *, memory: int | None = None,
              uuid: str | None = None, backing: str = "") -> str:
    """A plain libvirt domain: NUMA cells of the given sizes in bytes, or no cells and ``memory`` bytes."""
    uuid = uuid or str(uuid_module.uuid5(uuid_module.NAMESPACE_DNS, name))
    total = sum(cells) if cells else (memory or 16 * MiB)
    numa = ""
    if cells:
        rows = "".join(f'\n        <cell id="{i}" cpus="{i}" memory="{size // 1024}" unit="KiB"/>'
                       for i, size in enumerate(cells))
        numa = (f'\n  <cpu mode="custom" match="exact" check="none">\n    <model>qemu64</model>'
                f"\n    <numa>{rows}\n    </numa>\n  </cpu>")
    vcpus = len(cells) if cells else 1
    return f"""<domain type="kvm">
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit="KiB">{total // 1024}</memory>{backing}
  <vcpu placement="static">{vcpus}</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
  </os>{numa}
  <devices>
    <console type="pty"/>
    <memballoon model="none"/>
  </devices>
</domain>
"""


def enabled(xml: str, nodes: Sequence[int]) -> bytes:
    """The domain rewritten for dmem by the real define-time code, cells on ``nodes``."""
    return define.plan(xml, page_size=PAGE, rooms=None, nodes=list(nodes)).rewritten


def live(xml: bytes, dom_id: int) -> bytes:
    """The XML libvirt passes a running (or starting) domain's hook: the same, with id= on <domain>."""
    root = etree.fromstring(xml)
    root.set("id", str(dom_id))
    return etree.tostring(root)


def mount_tmpfs(directory: Path, size: int) -> None:
    """Mount a real tmpfs on ``directory``; fail (never skip) saying what is needed."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, (
        f"these tests need root and util-linux mount to mount a tmpfs: {done.stderr.strip()}")


class Rig:
    """A fake host with emulated dmemfs on a real tmpfs, and what libvirt would put around a guest."""

    def __init__(self, root: Path, *, nodes: int = 2, per_node: int = 64 * MiB, mount_size: int = 512 * MiB,
                 lock_timeout: float | None = None) -> None:
        self.root = root
        # Real CPU numbers: pinning threads are restricted to the node's CPUs.
        cpus = sorted(os.sched_getaffinity(0))
        spec = {n: FakeNode(cpus=[cpus[n % len(cpus)]], dmem_total=per_node) for n in range(nodes)}
        config = make_host(root, spec, emulate=True)
        if lock_timeout is not None:
            text = (root / "config.toml").read_text()
            state_dir = f'dir = "{config.state.dir}"'
            (root / "config.toml").write_text(text.replace(state_dir, f"{state_dir}\nlock_timeout = {lock_timeout}"))
            config = load(root / "config.toml")
        self.config: Config = config
        self.config_path = root / "config.toml"
        self.mount = config.dmemfs.mount
        mount_tmpfs(self.mount, mount_size)
        self.now = time.time()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False)

    # ---- the hook ---------------------------------------------------------------------------------

    def context(self) -> HookContext:
        ctx = HookContext.create(self.config)
        ctx.clock = lambda: self.now
        return ctx

    def call(self, name: str, operation: str, subop: str, xml: bytes | str, extra: str = "-",
             context: HookContext | None = None) -> Call:
        data = xml.encode() if isinstance(xml, str) else xml
        out, err = io.StringIO(), io.StringIO()
        code = hook.main(["dmem-libvirt-hook", name, operation, subop, extra], io.BytesIO(data), out, err,
                         context=context or self.context())
        return Call(code, out.getvalue(), err.getvalue())

    # ---- what libvirt does around the hook --------------------------------------------------------

    def domain_dir(self, name: str, dom_id: int, *, layout: str = "libvirt/qemu") -> Path:
        """Create the per-domain memory directory as libvirt does before ``start begin``."""
        directory = self.mount / layout / f"{dom_id}-{name[:20]}"
        directory.mkdir(mode=0o700, parents=True)
        os.chown(directory, QEMU_UID, QEMU_GID)
        return directory

    def running(self, name: str, xml: bytes, pid: int) -> None:
        """libvirt's status file and pid file for a running guest."""
        status = etree.Element("domstatus", state="running", reason="booted", pid=str(pid))
        status.append(etree.fromstring(xml))
        run_dir = self.config.libvirt.run_dir
        (run_dir / f"{name}.xml").write_bytes(etree.tostring(status))
        # libvirt 9.0 XML-escapes the name in the pid file's name only (measured: q&apos;u.pid, q'u.xml).
        (run_dir / f"{libvirt_escaped(name)}.pid").write_text(f"{pid}\n")

    def stopped(self, name: str) -> None:
        """What libvirt removes when a guest stops: status, pid and the memory directory's files."""
        run_dir = self.config.libvirt.run_dir
        (run_dir / f"{name}.xml").unlink(missing_ok=True)
        (run_dir / f"{libvirt_escaped(name)}.pid").unlink(missing_ok=True)
        for directory in self.mount.glob(f"libvirt/qemu/*-{name[:20]}"):
            for file in directory.iterdir():
                file.unlink()
            directory.rmdir()

    def qemu(self, pid: int, files: Sequence[Path] = (), *, mapped: int | None = None,
             start_ticks: int | None = None, policy: str | None = None) -> None:
        """A process in the fake /proc that maps ``files`` (``mapped`` bytes of each, default all).

        numa_maps shows each mapping bound to the node its ledger entry names, or ``policy``.
        """
        task = self.config.host.proc / str(pid)
        task.mkdir(parents=True, exist_ok=True)
        ticks = start_ticks if start_ticks is not None else 1000 + pid
        # fs/proc/array.c do_task_stat: start time is field 22.
        tail = " ".join(["0"] * 12 + [str(ticks)] + ["0"] * 30)
        (task / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194560 {tail}\n")
        try:
            nodes = {e.path: e.node for e in self.reservations()}
        except DmemError:
            nodes = {}
        lines = ["55d4c0a00000-55d4c0c00000 r-xp 00000000 fd:01 1234   /usr/bin/qemu-system-x86_64"]
        numa = ["55d4c0a00000 default file=/usr/bin/qemu-system-x86_64 mapped=512 N0=512 kernelpagesize_kB=4"]
        start = 0x7F0000000000
        for file in files:
            info = os.stat(file)
            length = info.st_size if mapped is None else mapped
            lines.append(f"{start:x}-{start + length:x} rw-s 00000000 "
                         f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x} {info.st_ino}   {file}")
            bound = policy or f"bind:{nodes.get(str(file), 0)}"
            numa.append(f"{start:x} {bound} file={os.path.realpath(file)} dirty={length // 4096} "
                        f"N0={length // 4096} kernelpagesize_kB=4")
            start += length + PAGE
        (task / "maps").write_text("\n".join(lines) + "\n")
        (task / "numa_maps").write_text("\n".join(numa) + "\n")

    def qemu_exits(self, pid: int) -> None:
        task = self.config.host.proc / str(pid)
        for file in task.iterdir():
            file.unlink()
        task.rmdir()

    # ---- looking at the host ----------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self.context().ledger

    def reservations(self) -> list[Reservation]:
        return self.ledger.read()

    def free_pages(self, node: int) -> int:
        return int((self.config.dmemfs.debugfs / f"node{node}" / "free_dpages").read_text())

    def total_free_pages(self) -> int:
        return int((self.config.dmemfs.debugfs / "free_dpages").read_text())


def libvirt_escaped(name: str) -> str:
    """A domain name as libvirt 9.0 writes it into the pid file's name."""
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"), ('"', "&quot;")):
        name = name.replace(raw, escaped)
    return name


def start_guest(rig: Rig, name: str, xml: bytes, dom_id: int, pid: int) -> tuple[bytes, Path]:
    """prepare, start and started, as libvirt runs them for ``virsh start``; returns the live XML and dir."""
    running = live(xml, dom_id)
    assert rig.call(name, "prepare", "begin", running) == Call(0, "", "")
    directory = rig.domain_dir(name, dom_id)
    assert rig.call(name, "start", "begin", running) == Call(0, "", "")
    rig.running(name, running, pid)
    rig.qemu(pid, sorted(directory.iterdir()))
    assert rig.call(name, "started", "begin", running) == Call(0, "", "")
    return running, directory


# ---- guests that are not ours ------------------------------------------------------------------------

OPERATIONS = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
              ("release", "end"), ("reconnect", "begin"), ("migrate", "begin"), ("restore", "begin")]


@pytest.mark.parametrize("backing", ["", "\n  <memoryBacking>\n    <hugepages/>\n  </memoryBacking>",
                                     "\n  <memoryBacking>\n    <source type='memfd'/>\n  </memoryBacking>"],
                         ids=["plain", "hugepages", "memfd"])
def test_guest_without_file_backed_ram_passes_every_operation_without_touching_the_ledger(
        rig: Rig, backing: str) -> None:
    xml = live(guest_xml("plain01", memory=64 * MiB, backing=backing).encode(), 3)
    for operation, subop in OPERATIONS:
        assert rig.call("plain01", operation, subop, xml) == Call(0, "", ""), operation
    assert not rig.config.state.dir.joinpath("ledger.json").exists()
    assert not rig.config.state.dir.joinpath("lock").exists()


def test_guest_without_file_backed_ram_leaves_an_existing_ledger_file_alone(rig: Rig) -> None:
    ours = enabled(guest_xml("web01", [16 * MiB]), [0])
    assert rig.call("web01", "prepare", "begin", live(ours, 1)).code == 0
    ledger = rig.config.state.dir / "ledger.json"
    before = ledger.stat().st_mtime_ns, ledger.read_bytes()
    plain = live(guest_xml("plain01", memory=64 * MiB).encode(), 2)
    for operation, subop in OPERATIONS:
        assert rig.call("plain01", operation, subop, plain).code == 0
    assert (ledger.stat().st_mtime_ns, ledger.read_bytes()) == before


def test_file_backed_guest_without_metadata_on_the_dmemfs_mount_is_refused_with_the_fix(rig: Rig) -> None:
    backing = "\n  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>"
    xml = live(guest_xml("db02", memory=64 * MiB, backing=backing).encode(), 4)
    result = rig.call("db02", "prepare", "begin", xml)
    assert result == Call(1, "", "dmem-libvirt: db02: memory_backing_dir is on dmemfs; "
                                 "run 'dmem-libvirt enable db02' or use memfd\n")
    assert rig.reservations() == []


def test_file_backed_guest_without_metadata_elsewhere_is_left_to_libvirt(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "host")
    try:
        elsewhere = tmp_path / "ram"
        elsewhere.mkdir()
        rig.config = replace(rig.config, libvirt=replace(rig.config.libvirt, memory_backing_dir=elsewhere))
        backing = "\n  <memoryBacking>\n    <access mode='shared'/>\n  </memoryBacking>"
        xml = live(guest_xml("db02", memory=64 * MiB, backing=backing).encode(), 4)
        assert rig.call("db02", "prepare", "begin", xml) == Call(0, "", "")
        assert not rig.config.state.dir.joinpath("ledger.json").exists()
    finally:
        rig.close()


@pytest.mark.parametrize("argv_tail", [["prepare", "end", "-"], ["start", "end", "-"], ["stopped", "begin", "-"],
                                       ["attach", "begin", "-"], ["frobnicate", "now", "x"]])
def test_operations_the_hook_does_not_handle_exit_0_even_for_our_guests(rig: Rig, argv_tail: list[str]) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    out, err = io.StringIO(), io.StringIO()
    code = hook.main(["dmem-libvirt-hook", "web01", *argv_tail], io.BytesIO(xml), out, err, context=rig.context())
    assert (code, out.getvalue(), err.getvalue()) == (0, "", "")
    assert rig.reservations() == []


def test_missing_arguments_print_usage_and_exit_2() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert hook.main(["dmem-libvirt-hook", "web01"], io.BytesIO(b""), out, err) == 2
    assert err.getvalue().startswith("usage: dmem-libvirt-hook NAME OPERATION SUBOP")


def test_unreadable_xml_of_our_guest_is_refused_at_prepare_and_ignored_at_release(rig: Rig) -> None:
    broken = b'<domain><name>web01</name><metadata><x xmlns="http://dmem-libvirt.org/xmlns/domain/1">'
    prepare = rig.call("web01", "prepare", "begin", broken)
    assert prepare.code == 1
    assert prepare.stderr.startswith("dmem-libvirt: web01: libvirt passed unreadable domain XML")
    assert prepare.stderr.count("\n") == 1
    assert rig.call("web01", "release", "end", broken) == Call(0, "", "")
    assert rig.call("web01", "reconnect", "begin", broken) == Call(0, "", "")


def test_plain_guest_call_imports_neither_lxml_nor_lifecycle(tmp_path: Path) -> None:
    xml = guest_xml("plain01", memory=64 * MiB)
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from dmem_libvirt.hook import entry\n"
              "sys.exit(entry())\n")
    for operation, subop in OPERATIONS:
        done = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c", script, "plain01", operation, subop,
                               "-"], input=xml.encode(), capture_output=True, check=False, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines()
                    if line.startswith("import time:")]
        assert "dmem_libvirt.hook" in imported
        heavy = [module for module in imported
                 if module.startswith("lxml") or module in ("dmem_libvirt.lifecycle", "dmem_libvirt.ledger")]
        assert heavy == [], f"{operation} {subop} imported {heavy}"


def test_hugepages_guest_call_does_not_import_lifecycle_either(tmp_path: Path) -> None:
    backing = "\n  <memoryBacking>\n    <hugepages/>\n  </memoryBacking>"
    xml = guest_xml("huge01", memory=64 * MiB, backing=backing)
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from dmem_libvirt.hook import entry\n"
              "sys.exit(entry())\n")
    done = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c", script, "huge01", "prepare", "begin",
                           "-"], input=xml.encode(), capture_output=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    imported = done.stderr.decode()
    assert "dmem_libvirt.lifecycle" not in imported
    assert "lxml" not in imported


# ---- operations that must never fail --------------------------------------------------------------


def test_release_and_reconnect_exit_0_when_the_host_cannot_even_be_read(rig: Rig) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    assert rig.call("web01", "prepare", "begin", xml).code == 0
    context = rig.context()
    os.rename(rig.config.state.dir, rig.config.state.dir.with_name("gone"))
    rig.config.state.dir.write_text("not a directory\n")
    assert rig.call("web01", "release", "end", xml, context=context) == Call(0, "", "")
    assert rig.call("web01", "reconnect", "begin", xml, context=context) == Call(0, "", "")
    failed = rig.call("web01", "prepare", "begin", xml, context=context)
    assert failed.code == 1
    assert failed.stderr.startswith("dmem-libvirt: web01: cannot create state directory")
