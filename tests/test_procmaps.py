"""The /proc readers against this very process (real /proc) and against small fake proc trees."""

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmem_libvirt import numa, procmaps
from dmem_libvirt.errors import HostError

PROC = Path("/proc")
PAGE = 4096


@pytest.fixture
def shared_file(tmp_path: Path) -> Iterator[Path]:
    """An 8-page file on a real tmpfs (no swap or page-cache surprises for shared mappings)."""
    directory = tmp_path / "mem"
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(directory)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"these tests need root to mount a tmpfs: {done.stderr.strip()}"
    try:
        path = directory.resolve() / "ram-node0"
        path.write_bytes(bytes(8 * PAGE))
        yield path
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def fake_pid(proc: Path, pid: int, **files: str | bytes) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    for name, content in files.items():
        target = directory / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def test_mappers_finds_this_process_while_it_maps_the_file_and_not_after_munmap(shared_file: Path) -> None:
    device, inode = identity(shared_file)
    fd = os.open(shared_file, os.O_RDWR)
    try:
        address = numa.map_shared(fd, 8 * PAGE)
        try:
            assert os.getpid() in procmaps.mappers(PROC, device, inode)
        finally:
            numa.unmap(address, 8 * PAGE)
    finally:
        os.close(fd)

    assert procmaps.mappers(PROC, device, inode) == []


def test_an_open_but_unmapped_file_has_no_mappers(shared_file: Path) -> None:
    device, inode = identity(shared_file)
    with open(shared_file, "rb"):
        assert procmaps.mappers(PROC, device, inode) == []


def test_maps_inode_adds_up_every_mapping_of_the_file(shared_file: Path) -> None:
    device, inode = identity(shared_file)
    with open(shared_file, "r+b") as handle:
        first = mmap.mmap(handle.fileno(), 3 * PAGE, mmap.MAP_SHARED)
        second = mmap.mmap(handle.fileno(), 2 * PAGE, mmap.MAP_SHARED, offset=4 * PAGE)
        try:
            assert procmaps.maps_inode(PROC, os.getpid(), device, inode) == 5 * PAGE
        finally:
            first.close()
            second.close()
        assert procmaps.maps_inode(PROC, os.getpid(), device, inode) == 0


def test_maps_inode_ignores_the_same_inode_number_on_another_device(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, maps=(
        "7f0000000000-7f0000200000 rw-s 00000000 00:2d 12   /dev/dmem/a/ram-node0\n"
        "7f0000200000-7f0000300000 rw-s 00000000 103:1a 12  /var/lib/other\n"))

    assert procmaps.maps_inode(tmp_path, 7, os.makedev(0, 0x2d), 12) == 2 << 20
    assert procmaps.maps_inode(tmp_path, 7, os.makedev(0x103, 0x1a), 12) == 1 << 20
    assert procmaps.maps_inode(tmp_path, 7, os.makedev(0, 0x2d), 1) == 0


def test_mappers_skips_pids_that_vanished_and_lists_the_rest_in_order(tmp_path: Path) -> None:
    line = "7f0000000000-7f0000200000 rw-s 00000000 00:2d 12   /dev/dmem/a/ram-node0\n"
    fake_pid(tmp_path, 30, maps=line)
    fake_pid(tmp_path, 4, maps=line)
    fake_pid(tmp_path, 9)  # exited between listing /proc and reading maps
    fake_pid(tmp_path, 5, maps="")  # kernel thread
    (tmp_path / "self").mkdir()

    assert procmaps.mappers(tmp_path, os.makedev(0, 0x2d), 12) == [4, 30]


def test_a_malformed_maps_line_is_reported_with_its_text(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, maps="zz-7f rw-s 00000000 00:2d 12 /x\n")

    with pytest.raises(HostError, match="zz-7f"):
        procmaps.maps_inode(tmp_path, 7, os.makedev(0, 0x2d), 12)


def test_numa_policy_reads_the_policy_of_a_path_with_spaces(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, numa_maps=(
        "55a283722000 default file=/usr/bin/qemu mapped=2 N0=2 kernelpagesize_kB=4\n"
        "7f0000000000 bind:1 file=/dev/dmem/1-my guest/ram-node0 dirty=512 N1=512 kernelpagesize_kB=4\n"
        "7f1000000000 prefer:0 anon=3 dirty=3 N0=3 kernelpagesize_kB=4\n"))

    assert procmaps.numa_policy(tmp_path, 7, Path("/dev/dmem/1-my guest/ram-node0")) == "bind:1"
    assert procmaps.numa_policy(tmp_path, 7, Path("/dev/dmem/1-my")) is None
    assert procmaps.numa_policy(tmp_path, 8, Path("/usr/bin/qemu")) is None


def test_numa_policy_of_a_real_bound_mapping(shared_file: Path) -> None:
    fd = os.open(shared_file, os.O_RDWR)
    address = numa.map_shared(fd, 8 * PAGE)
    try:
        numa.mbind(address, 8 * PAGE, 0)
        assert procmaps.numa_policy(PROC, os.getpid(), shared_file) == "bind:0"
    finally:
        numa.unmap(address, 8 * PAGE)
        os.close(fd)


def test_cmdline_and_alive_follow_a_real_process_until_it_is_reaped() -> None:
    # The child says it is ready only after exec, so its cmdline is already its own.
    code = "import sys, time; print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert procmaps.cmdline(PROC, child.pid) == [sys.executable, "-c", code]
        assert procmaps.alive(PROC, child.pid)
        child.kill()
        # Killed but not yet waited for: a zombie maps nothing and is not alive.
        deadline = time.monotonic() + 5
        while procmaps.alive(PROC, child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not procmaps.alive(PROC, child.pid)
    finally:
        child.kill()
        child.wait()
    assert procmaps.cmdline(PROC, child.pid) == []
    assert not procmaps.alive(PROC, child.pid)


def test_cmdline_keeps_empty_and_non_utf8_arguments(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, cmdline=b"qemu-system-x86_64\0\0-name\0guest=caf\xe9\0")
    fake_pid(tmp_path, 8, cmdline=b"")

    assert procmaps.cmdline(tmp_path, 7) == ["qemu-system-x86_64", "", "-name", "guest=caf\udce9"]
    assert procmaps.cmdline(tmp_path, 8) == []


def test_alive_reads_the_state_after_a_command_name_with_parentheses(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, stat="7 (qemu (x) Z) S 1 7 7 0 -1\n")
    fake_pid(tmp_path, 8, stat="8 (qemu) Z 1 8 8 0 -1\n")

    assert procmaps.alive(tmp_path, 7)
    assert not procmaps.alive(tmp_path, 8)
    assert not procmaps.alive(tmp_path, 9)
    assert not procmaps.alive(tmp_path, 0)
