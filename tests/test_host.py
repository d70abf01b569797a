"""Host reading: sysfs NUMA nodes, qemu.conf, boot_id, statfs (dmem pools: tests/test_backend_dmemfs.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fakehost import (
    FakeNode,
    load_static_host,
    make_host,
    static_host_names,
    write_sysfs,
)

from dmem_libvirt.backends.dmemfs import DmemfsBackend
from dmem_libvirt.config import Config, HostConfig, LibvirtConfig
from dmem_libvirt.errors import HostError
from dmem_libvirt.host import Host, fs_magic, parse_cpulist
from dmem_libvirt.units import GiB

# ---- parse_cpulist ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
        ("5", {5}),
        ("", set()),
        ("\n", set()),
        ("0-7,^3", {0, 1, 2, 4, 5, 6, 7}),
        ("0-3,^0,^1", {2, 3}),
        # libvirt applies exclusions left to right: a later range puts the CPU back.
        ("^3,0-4", {0, 1, 2, 3, 4}),
        (" 0 - 2 , 4 ", {0, 1, 2, 4}),
    ],
)
def test_cpulist_parses_kernel_and_libvirt_syntax(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == frozenset(cpus)


@pytest.mark.parametrize("text", ["abc", "3-1", "0,,1", "-1", "1-", "0-3:2/4", "^1-2", "1,2,", "٣"])
def test_cpulist_rejects_malformed_text_quoting_it(text: str) -> None:
    with pytest.raises(ValueError, match="not a CPU list") as caught:
        parse_cpulist(text)
    assert repr(text) in str(caught.value)


# ---- NUMA nodes -------------------------------------------------------------------------------


def test_nodes_of_a_two_node_host_have_cpus_distances_and_memory(tmp_path: Path) -> None:
    host = Host(load_static_host("two-nodes", tmp_path))
    assert host.online_nodes() == [0, 1]
    node1 = host.node(1)
    assert node1.cpus == frozenset(range(16, 32))
    assert node1.distances == (21, 10)
    assert node1.mem_total == 64 * GiB
    assert node1.mem_free == 60 * GiB


def test_one_node_host_reports_node0_only(tmp_path: Path) -> None:
    host = Host(load_static_host("one-node", tmp_path))
    assert [info.node for info in host.nodes()] == [0]
    assert host.node(0).cpus == frozenset(range(8))
    assert host.node(0).distances == (10,)


def test_four_node_host_reads_split_smt_cpu_ranges(tmp_path: Path) -> None:
    host = Host(load_static_host("four-nodes", tmp_path))
    assert host.node(1).cpus == frozenset([*range(8, 16), *range(40, 48)])
    assert host.node(3).distances == (16, 16, 16, 10)


def test_eight_node_host_distances_tell_sockets_apart(tmp_path: Path) -> None:
    host = Host(load_static_host("eight-nodes", tmp_path))
    assert host.online_nodes() == list(range(8))
    assert host.node(5).distances == (32, 32, 32, 32, 12, 10, 12, 12)


def test_asymmetric_host_has_a_cpuless_memory_node(tmp_path: Path) -> None:
    host = Host(load_static_host("asymmetric", tmp_path))
    nodes = {info.node: info for info in host.nodes()}
    assert nodes[2].cpus == frozenset()
    assert nodes[2].mem_total == 64 * GiB
    assert len(nodes[0].cpus) == 24 and len(nodes[1].cpus) == 8


@pytest.mark.parametrize("name", static_host_names())
def test_every_static_host_reads_consistently(name: str, tmp_path: Path) -> None:
    host = Host(load_static_host(name, tmp_path))
    online = host.online_nodes()
    for position, info in enumerate(host.nodes()):
        assert len(info.distances) == len(online)
        assert info.distances[position] == 10
        assert 0 < info.mem_free <= info.mem_total
    assert set(DmemfsBackend(host.config, host).pools()) <= set(online)


def test_node_distances_follow_the_online_list_when_node_numbers_have_gaps(tmp_path: Path) -> None:
    config = make_host(tmp_path, {0: FakeNode("0-1"), 2: FakeNode("2-3")},
                       distances={0: [10, 30], 2: [30, 10]})
    host = Host(config)
    assert host.online_nodes() == [0, 2]
    assert host.node(2).distances == (30, 10)


def test_missing_node_names_the_directory_and_the_online_nodes(tmp_path: Path) -> None:
    host = Host(make_host(tmp_path, 2))
    with pytest.raises(HostError) as caught:
        host.node(3)
    line = caught.value.line()
    assert f"{tmp_path}/sys/devices/system/node/node3" in line
    assert "online nodes: 0,1" in line


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("online", "zero\n", "'zero\\n'"),
        ("node0/cpulist", "0-x\n", "'0-x\\n'"),
        ("node0/distance", "10 twenty\n", "'10 twenty\\n'"),
        ("node0/distance", "\n", "'\\n'"),
        ("node0/meminfo", "Node 0 MemTotal: lots kB\nNode 0 MemFree: 1 kB\n", "'Node 0 MemTotal: lots kB'"),
        ("node0/meminfo", "Node 1 MemTotal: 4 kB\nNode 1 MemFree: 1 kB\n", "'Node 1 MemTotal: 4 kB'"),
        ("node0/meminfo", "Node 0 MemTotal: 4 MB\nNode 0 MemFree: 1 kB\n", "'Node 0 MemTotal: 4 MB'"),
        ("node0/meminfo", "Node 0 MemTotal: 4 kB\n", "no MemFree line"),
    ],
)
def test_malformed_sysfs_file_error_quotes_file_and_text(
        tmp_path: Path, name: str, text: str, expected: str) -> None:
    config = make_host(tmp_path, 1)
    path = write_sysfs(config, name, text)
    with pytest.raises(HostError) as caught:
        Host(config).nodes()
    line = caught.value.line()
    assert line.startswith(f"dmem-libvirt: cannot parse {path}: ")
    assert expected in line


def test_missing_sysfs_file_names_the_path(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1)
    missing = config.host.sysfs / "devices" / "system" / "node" / "node0" / "meminfo"
    missing.unlink()
    with pytest.raises(HostError, match=f"cannot read {missing}: no such file"):
        Host(config).node(0)


# ---- boot id ----------------------------------------------------------------------------------


def test_boot_id_is_read_stripped(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, boot_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    assert Host(config).boot_id() == "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_malformed_boot_id_is_refused_quoting_it(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1)
    path = config.host.proc / "sys" / "kernel" / "random" / "boot_id"
    path.write_text("not-a-uuid\n")
    with pytest.raises(HostError, match=f"cannot parse {path}: 'not-a-uuid\\\\n' is not a boot id"):
        Host(config).boot_id()


def test_host_reads_nothing_until_asked(tmp_path: Path) -> None:
    # Only /proc exists: the hook asks for boot_id and must not trip over a missing sysfs or debugfs.
    make_host(tmp_path / "real", 1, boot_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    config = Config(host=HostConfig(sysfs=tmp_path / "absent", proc=tmp_path / "real" / "proc"))
    host = Host(config)
    assert host.boot_id() == "0f8fad5b-d9cb-469f-a165-70867728950e"
    with pytest.raises(HostError, match="absent/devices/system/node/online"):
        host.online_nodes()


def test_fs_magic_reads_the_real_filesystem_type(tmp_path: Path) -> None:
    stat = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    assert fs_magic(tmp_path) == int(stat.stdout, 16)


def test_fs_magic_of_a_missing_path_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fs_magic(tmp_path / "missing")


# ---- memory_backing_dir -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qemu_conf", "expected"),
    [
        ('memory_backing_dir = "/dev/dmem"\n', "/dev/dmem"),
        ('memory_backing_dir="/dev/dmem"\n', "/dev/dmem"),
        ("  memory_backing_dir\t=  '/dev/dmem'  # on dmemfs\n", "/dev/dmem"),
        ('memory_backing_dir = """/dev/dmem"""\n', "/dev/dmem"),
        ('user = "root"; memory_backing_dir = "/dev/dmem"\n', "/dev/dmem"),
        ('#memory_backing_dir = "/dev/dmem"\n', "/var/lib/libvirt/qemu/ram"),
        ('# memory_backing_dir = "/dev/dmem"\nuser = "qemu"\n', "/var/lib/libvirt/qemu/ram"),
        ("", "/var/lib/libvirt/qemu/ram"),
        ('memory_backing_dir = "/first"\nmemory_backing_dir = "/second"\n', "/first"),
        ('cgroup_controllers = [ "cpu",\n  "memory_backing_dir = nope",\n]\n'
         'nvram = [ ]\nmax_files = 32768\nmemory_backing_dir = "/dev/dmem"\n', "/dev/dmem"),
    ],
)
def test_memory_backing_dir_is_read_from_qemu_conf(tmp_path: Path, qemu_conf: str, expected: str) -> None:
    assert Host(make_host(tmp_path, 1, qemu_conf=qemu_conf)).memory_backing_dir() == Path(expected)


def test_memory_backing_dir_defaults_when_qemu_conf_is_absent(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1)
    config.libvirt.qemu_conf.unlink()
    assert Host(config).memory_backing_dir() == Path("/var/lib/libvirt/qemu/ram")


def test_memory_backing_dir_in_config_overrides_qemu_conf(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, memory_backing_dir=Path("/srv/ram"))
    assert Host(config).memory_backing_dir() == Path("/srv/ram")


def test_static_hosts_point_libvirt_at_their_dmemfs_mount(tmp_path: Path) -> None:
    config = load_static_host("one-node", tmp_path)
    assert Host(config).memory_backing_dir() == config.dmemfs.mount


@pytest.mark.parametrize(
    ("qemu_conf", "expected"),
    [
        ('memory_backing_dir = "/dev/dmem\n', "line 1: cannot read '\"/dev/dmem'"),
        ('memory_backing_dir "/dev/dmem"\n', "line 1: expected 'name = value'"),
        ('user = "root"\nmemory_backing_dir =\n', "line 2: expected a value after '='"),
        ('nvram = [ "a" "b" ]\n', "line 1: expected ',' or ']' in a list"),
        ('nvram = [ "a",\n', "line 1: list is not closed"),
        ('memory_backing_dir = "a" "b"\n', "line 1: unexpected 'b' after a value"),
        ("memory_backing_dir = 5\n", "memory_backing_dir = 5 is not an absolute path"),
        ('memory_backing_dir = "ram"\n', "memory_backing_dir = 'ram' is not an absolute path"),
    ],
)
def test_malformed_qemu_conf_is_refused_naming_file_and_line(
        tmp_path: Path, qemu_conf: str, expected: str) -> None:
    config = make_host(tmp_path, 1, qemu_conf=qemu_conf)
    with pytest.raises(HostError) as caught:
        Host(config).memory_backing_dir()
    line = caught.value.line()
    assert line.startswith(f"dmem-libvirt: cannot parse {config.libvirt.qemu_conf}: ")
    assert expected in line


# ---- the real machine -------------------------------------------------------------------------


def test_real_sysfs_has_node0_with_this_machines_cpus_and_memory() -> None:
    host = Host(Config())
    assert 0 in host.online_nodes()
    node0 = host.node(0)
    all_cpus = frozenset().union(*(info.cpus for info in host.nodes()))
    assert all_cpus == parse_cpulist(Path("/sys/devices/system/cpu/online").read_text())
    assert node0.distances[host.online_nodes().index(0)] == 10
    assert 0 < node0.mem_free <= node0.mem_total <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_real_boot_id_matches_the_kernels() -> None:
    kernel = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert Host(Config()).boot_id() == kernel


def test_real_qemu_conf_gives_an_absolute_backing_dir() -> None:
    config = Config(libvirt=LibvirtConfig())
    assert Host(config).memory_backing_dir().is_absolute()
