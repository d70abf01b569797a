"""The sandbox itself: a private libvirtd that starts real QEMU guests, file-backed RAM on the emulated
dmemfs mount, and a teardown (or a crashed session's cleanup) that leaves nothing running or mounted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from dmem_libvirt.units import MiB

from .conftest import GuestFactory, bring_up, sandbox_root
from sandbox import STATE_FILE, Sandbox, SandboxState, guest_xml, memory_arguments, mount_points

Start = Callable[[str, str], int]


def running_pid(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def ours(root: Path, points: list[Path]) -> list[Path]:
    return [p for p in points if p == root or root in p.parents]


def sandbox_pids(box: Sandbox) -> dict[str, int]:
    run = box.private("/run/libvirt")
    return {"holder": box.holder,
            "libvirtd": int((run / "libvirtd.pid").read_text()),
            "virtlogd": int((run / "virtlogd.pid").read_text())}


def test_sandbox_daemon_answers_inside_and_through_its_uri_outside(sandbox: Sandbox) -> None:
    assert "QEMU" in sandbox.virsh("version").stdout
    conn = libvirt.open(sandbox.uri)
    try:
        assert conn.getLibVersion() >= 9_000_000
        caps = conn.getCapabilities()
    finally:
        conn.close()
    assert f"<domain type='{sandbox.domain_type}'" in caps


def test_private_qemu_conf_points_libvirt_at_the_emulated_dmem_mount(sandbox: Sandbox) -> None:
    inside = sandbox.run(["cat", "/etc/libvirt/qemu.conf"]).stdout
    assert f'memory_backing_dir = "{sandbox.dmem_mount}"' in inside
    host_conf = Path("/etc/libvirt/qemu.conf")
    assert not host_conf.exists() or str(sandbox.root) not in host_conf.read_text()
    config = sandbox.run(["cat", "/etc/dmem-libvirt/config.toml"]).stdout
    assert "emulate = true" in config and f'debugfs = "{sandbox.debugfs}"' in config


def test_emulated_debugfs_counts_two_gib_per_node_in_2mib_pages(sandbox: Sandbox) -> None:
    assert (sandbox.debugfs / "dpage_shift").read_text() == "21\n"
    for node in sandbox.nodes():
        assert (sandbox.debugfs / f"node{node}" / "total_dpages").read_text() == "1024\n"
    assert (sandbox.debugfs / "total_dpages").read_text() == f"{1024 * len(sandbox.nodes())}\n"


def test_cli_run_finds_the_venvs_commands_by_name(sandbox: Sandbox) -> None:
    result = subprocess.run([sys.executable, "tests/sandbox.py", "--root", str(sandbox.root), "run", "--",
                             "dmem-libvirt", "status", "--json"], capture_output=True, text=True, timeout=120,
                            check=False, cwd=Path(__file__).resolve().parents[2])
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout)["emulated"] is True


def test_dmem_mount_is_a_size_limited_tmpfs_seen_only_inside(sandbox: Sandbox) -> None:
    fields = sandbox.run(["findmnt", "-n", "-b", "-o", "FSTYPE,SIZE", str(sandbox.dmem_mount)]).stdout.split()
    assert fields[0] == "tmpfs"
    assert 2048 * MiB <= int(fields[1]) <= 2048 * MiB * len(sandbox.nodes()) + 128 * MiB
    assert ours(sandbox.root, mount_points()) == []


def test_plain_guest_starts_and_stops(hookless: Sandbox, guest: GuestFactory, running: Start) -> None:
    sandbox = hookless
    pid = running("plain", guest("plain"))
    assert sandbox.virsh("domstate", "plain").stdout.strip() == "running"
    assert running_pid(pid)
    args = memory_arguments(sandbox.qemu_cmdline("plain"))
    assert args and "memory-backend-ram" in args[0]
    sandbox.virsh("destroy", "plain")
    assert sandbox.virsh("domstate", "plain").stdout.strip() == "shut off"
    assert not running_pid(pid)


@pytest.mark.parametrize(("cells", "files"), [((), ["pc.ram"]),
                                              ((128 * MiB, 128 * MiB), ["ram-node0", "ram-node1"])])
def test_file_backed_guest_maps_its_ram_from_a_per_domain_dir_on_the_dmem_mount(
        hookless: Sandbox, guest: GuestFactory, running: Start, cells: tuple[int, ...],
        files: list[str]) -> None:
    name = f"filebacked-{len(cells)}"
    running(name, guest(name, cells=cells, file_backed=True))
    domid = hookless.virsh("domid", name).stdout.strip()
    # libvirt 9.0: <memory_backing_dir>/libvirt/qemu/<id>-<name[:20]>/<backend id>
    directory = hookless.dmem_mount / "libvirt" / "qemu" / f"{domid}-{name[:20]}"
    backends = [json.loads(arg) for arg in memory_arguments(hookless.qemu_cmdline(name))]
    assert [(b["qom-type"], b["mem-path"]) for b in backends] == [
        ("memory-backend-file", str(directory / file)) for file in files]
    for file in files:
        assert hookless.inside(directory / file).stat().st_size == (sum(cells) or 256 * MiB) // len(files)


def test_down_stops_guests_and_daemons_and_unmounts_everything() -> None:
    box = bring_up(sandbox_root("down"), hook=False)
    root = box.root
    box.define(guest_xml("doomed", domain_type=box.domain_type, file_backed=True))
    box.virsh("start", "doomed")
    pids = {**sandbox_pids(box), "qemu": box.qemu_pid("doomed")}
    assert ours(root, _mounts_of(box.holder))
    box.down()
    assert {name: pid for name, pid in pids.items() if running_pid(pid)} == {}
    assert ours(root, mount_points()) == []
    assert not root.exists()


def test_next_up_cleans_a_sandbox_whose_session_was_killed() -> None:
    root = sandbox_root("crashed")
    crash = ("import os, signal, sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
             "from sandbox import Sandbox; "
             "Sandbox(Path(sys.argv[1]), hook=False).up(); os.kill(os.getpid(), signal.SIGKILL)")
    tests_dir = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", crash, str(root), tests_dir], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr
    state = SandboxState.load(root / STATE_FILE)
    assert state is not None
    left = Sandbox(root)
    left._state = state
    pids = sandbox_pids(left)
    assert all(running_pid(pid) for pid in pids.values())
    box = bring_up(sandbox_root("after-crash"), hook=False)
    try:
        assert {name: pid for name, pid in pids.items() if running_pid(pid)} == {}
        assert not root.exists()
    finally:
        box.down()


def _mounts_of(pid: int) -> list[Path]:
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return [Path(line.split()[4]) for line in lines]


@pytest.mark.parametrize("kwargs", [{}, {"file_backed": True, "console": True},
                                    {"cells": (128 * MiB, 128 * MiB), "file_backed": True}])
def test_guest_xml_is_valid_libvirt_domain_xml(tmp_path: Path, kwargs: dict[str, object]) -> None:
    path = tmp_path / "guest.xml"
    path.write_text(guest_xml("schema-check", domain_type="kvm", **kwargs))  # type: ignore[arg-type]
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
