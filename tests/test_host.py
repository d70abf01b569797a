"""Host reading: sysfs NUMA nodes, dmem debugfs pools and page size, qemu.conf, boot_id."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fakehost import (
    FakeNode,
    load_static_host,
    make_host,
    set_free,
    static_host_names,
    write_debugfs,
    write_sysfs,
)

from dmem_libvirt import host as host_module
from dmem_libvirt.config import Config, HostConfig, LibvirtConfig
from dmem_libvirt.cpulist import parse_cpulist
from dmem_libvirt.errors import HostError
from dmem_libvirt.host import DmemPool, Host, fs_magic
from dmem_libvirt.units import GiB, KiB, MiB

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
    assert set(host.dmem_pools()) <= set(online)


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


# ---- dmem page size ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shift", "size"), [(12, 4 * KiB), (21, 2 * MiB), (30, GiB)])
def test_page_size_comes_from_debugfs_dpage_shift(tmp_path: Path, shift: int, size: int) -> None:
    assert Host(make_host(tmp_path, 1, page_shift=shift)).dmem_page_size() == size


def test_configured_page_size_matching_debugfs_is_accepted(tmp_path: Path) -> None:
    assert Host(make_host(tmp_path, 1, page_shift=21, page_size=2 * MiB)).dmem_page_size() == 2 * MiB


def test_configured_page_size_contradicting_debugfs_names_both(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, page_shift=21, page_size=GiB)
    with pytest.raises(HostError) as caught:
        Host(config).dmem_page_size()
    line = caught.value.line()
    assert "[dmemfs] page_size is 1 GiB" in line
    assert f"{config.dmemfs.debugfs}/dpage_shift says 2 MiB" in line


def test_page_size_falls_back_to_config_before_the_first_mount(tmp_path: Path) -> None:
    # dpage_shift reads 0 until dmemfs is mounted; the mount dir here is a plain directory.
    config = make_host(tmp_path, 1, page_shift=None, page_size=2 * MiB)
    assert Host(config).dmem_page_size() == 2 * MiB


def test_page_size_falls_back_to_config_without_debugfs(tmp_path: Path) -> None:
    config = load_static_host("no-debugfs", tmp_path)
    assert Host(config).dmem_page_size() == 2 * MiB


def test_unknown_page_size_says_how_to_find_it(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, debugfs=False)
    with pytest.raises(HostError) as caught:
        Host(config).dmem_page_size()
    line = caught.value.line()
    assert f"mount -t dmemfs none -o pagesize=2M {config.dmemfs.mount}" in line
    assert "mount -t debugfs none /sys/kernel/debug" in line
    assert "[dmemfs] page_size" in line


def test_page_size_comes_from_statfs_of_a_dmemfs_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No dmemfs kernel here: stand in for statfs(2) on the mount, which reports the dmemfs magic and
    # the page size in f_bsize.
    config = make_host(tmp_path, 1, debugfs=False)
    seen: list[Path] = []

    def dmemfs_statfs(path: Path | str) -> tuple[int, int]:
        seen.append(Path(path))
        return host_module.DMEMFS_MAGIC, GiB

    monkeypatch.setattr(host_module, "_statfs", dmemfs_statfs)
    assert Host(config).dmem_page_size() == GiB
    assert seen == [config.dmemfs.mount]


def test_statfs_page_size_contradicting_config_names_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_host(tmp_path, 1, debugfs=False, page_size=4 * KiB)
    monkeypatch.setattr(host_module, "_statfs", lambda path: (host_module.DMEMFS_MAGIC, 2 * MiB))
    with pytest.raises(HostError, match=r"page_size is 4 KiB but statfs\(.*/dmem\) says 2 MiB"):
        Host(config).dmem_page_size()


def test_page_size_outside_4k_2m_1g_is_refused(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, page_shift=16)
    with pytest.raises(HostError, match="dpage_shift gives a dmem page size of 65536 bytes"):
        Host(config).dmem_page_size()
    with pytest.raises(HostError, match="page_size 3145728 bytes is not a dmem page size"):
        Host(make_host(tmp_path / "b", 1, page_size=3 * MiB)).dmem_page_size()


def test_malformed_dpage_shift_quotes_file_and_text(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1)
    path = write_debugfs(config, "dpage_shift", "21 pages\n")
    with pytest.raises(HostError) as caught:
        Host(config).dmem_page_size()
    assert caught.value.line() == f"dmem-libvirt: cannot parse {path}: '21 pages\\n' is not a decimal number"


def test_fs_magic_reads_the_real_filesystem_type(tmp_path: Path) -> None:
    stat = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    assert fs_magic(tmp_path) == int(stat.stdout, 16)


def test_fs_magic_of_a_missing_path_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fs_magic(tmp_path / "missing")


# ---- dmem pools -------------------------------------------------------------------------------


def test_pools_are_debugfs_counts_times_the_page_size(tmp_path: Path) -> None:
    host = Host(load_static_host("two-nodes", tmp_path))
    assert host.debugfs_available()
    assert host.dmem_pools() == {0: DmemPool(0, 48 * GiB, 40 * GiB), 1: DmemPool(1, 48 * GiB, 48 * GiB)}


def test_pools_with_4k_pages_on_an_asymmetric_host(tmp_path: Path) -> None:
    pools = Host(load_static_host("asymmetric", tmp_path)).dmem_pools()
    assert pools == {0: DmemPool(0, 64 * GiB, 60 * GiB), 1: DmemPool(1, 16 * GiB, 4 * GiB),
                     2: DmemPool(2, 48 * GiB, 48 * GiB)}


def test_pools_with_1g_pages_on_eight_nodes(tmp_path: Path) -> None:
    pools = Host(load_static_host("eight-nodes", tmp_path)).dmem_pools()
    assert [pool.free for pool in pools.values()] == [(48 - n) * GiB for n in range(8)]
    assert all(pool.total == 48 * GiB for pool in pools.values())


def test_nodes_without_dmem_have_no_pool(tmp_path: Path) -> None:
    host = Host(load_static_host("partial-dmem", tmp_path))
    assert host.online_nodes() == [0, 1, 2, 3]
    assert sorted(host.dmem_pools()) == [1, 3]
    assert host.dmem_pools()[3] == DmemPool(3, 32 * GiB, 32 * GiB)


def test_pools_follow_the_kernels_free_count(tmp_path: Path) -> None:
    config = load_static_host("four-nodes", tmp_path)
    host = Host(config)
    assert host.dmem_pools()[2].free == 80 * GiB
    set_free(config, 2, 512)
    assert host.dmem_pools()[2].free == GiB
    assert (config.dmemfs.debugfs / "free_dpages").read_text() == f"{49152 + 45056 + 512 + 36864}\n"


def test_malformed_free_count_quotes_file_and_text(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2)
    path = write_debugfs(config, "node1/free_dpages", "abc\n")
    with pytest.raises(HostError) as caught:
        Host(config).dmem_pools()
    assert caught.value.line() == f"dmem-libvirt: cannot parse {path}: 'abc\\n' is not a decimal number"


@pytest.mark.parametrize("text", ["", "-1\n", "12 \n", "0x10\n", "1\n2\n"])
def test_counts_must_be_one_decimal_number(tmp_path: Path, text: str) -> None:
    config = make_host(tmp_path, 1)
    write_debugfs(config, "node0/total_dpages", text)
    with pytest.raises(HostError, match="is not a decimal number"):
        Host(config).dmem_pools()


def test_free_above_total_is_refused_with_both_counts(tmp_path: Path) -> None:
    config = make_host(tmp_path, {0: FakeNode(dmem_total=2 * GiB)})
    set_free(config, 0, 2000)
    with pytest.raises(HostError, match="reports 2000 free dmem pages of 1024 total"):
        Host(config).dmem_pools()


def test_pools_before_the_first_mount_say_to_mount_dmemfs(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2, page_shift=None)
    with pytest.raises(HostError) as caught:
        Host(config).dmem_pools()
    line = caught.value.line()
    assert "dmemfs has not been mounted since boot" in line
    assert f"mount -t dmemfs none -o pagesize=2M {config.dmemfs.mount}" in line


def test_missing_node_counter_names_the_file(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2)
    missing = config.dmemfs.debugfs / "node1" / "free_dpages"
    missing.unlink()
    with pytest.raises(HostError, match=f"cannot read {missing}: no such file"):
        Host(config).dmem_pools()


def test_without_debugfs_pools_are_the_configured_capacity(tmp_path: Path) -> None:
    host = Host(load_static_host("no-debugfs", tmp_path))
    assert not host.debugfs_available()
    assert host.dmem_pools() == {0: DmemPool(0, 40 * GiB, 40 * GiB), 1: DmemPool(1, 24 * GiB, 24 * GiB)}


def test_without_debugfs_or_capacity_pools_name_both_fixes(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, debugfs=False)
    with pytest.raises(HostError) as caught:
        Host(config).dmem_pools()
    line = caught.value.line()
    assert str(config.dmemfs.debugfs) in line
    assert "mount -t debugfs none /sys/kernel/debug" in line
    assert "[dmemfs.capacity]" in line


def test_debugfs_counts_win_over_configured_capacity(tmp_path: Path) -> None:
    config = make_host(tmp_path, {0: FakeNode(dmem_total=4 * GiB, dmem_free=GiB)}, capacity={0: 8 * GiB})
    assert Host(config).dmem_pools() == {0: DmemPool(0, 4 * GiB, GiB)}


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
