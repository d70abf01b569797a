"""The dmemfs backend's kernel interface: page size from debugfs/statfs/config, pools from debugfs/capacity."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakehost import FakeNode, load_static_host, make_host, set_free, write_debugfs

from dmem_libvirt import host as host_module
from dmem_libvirt.backends import Pool
from dmem_libvirt.backends.dmemfs import DMEMFS_MAGIC, DmemfsBackend
from dmem_libvirt.config import Config
from dmem_libvirt.errors import HostError
from dmem_libvirt.host import Host
from dmem_libvirt.units import GiB, KiB, MiB


def dmemfs(config: Config) -> DmemfsBackend:
    return DmemfsBackend(config, Host(config))


# ---- dmem page size ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shift", "size"), [(12, 4 * KiB), (21, 2 * MiB), (30, GiB)])
def test_page_size_comes_from_debugfs_dpage_shift(tmp_path: Path, shift: int, size: int) -> None:
    assert dmemfs(make_host(tmp_path, 1, page_shift=shift)).page_size() == size


def test_configured_page_size_matching_debugfs_is_accepted(tmp_path: Path) -> None:
    assert dmemfs(make_host(tmp_path, 1, page_shift=21, page_size=2 * MiB)).page_size() == 2 * MiB


def test_configured_page_size_contradicting_debugfs_names_both(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, page_shift=21, page_size=GiB)
    with pytest.raises(HostError) as caught:
        dmemfs(config).page_size()
    line = caught.value.line()
    assert "[dmemfs] page_size is 1 GiB" in line
    assert f"{config.dmemfs.debugfs}/dpage_shift says 2 MiB" in line


def test_page_size_falls_back_to_config_before_the_first_mount(tmp_path: Path) -> None:
    # dpage_shift reads 0 until dmemfs is mounted; the mount dir here is a plain directory.
    config = make_host(tmp_path, 1, page_shift=None, page_size=2 * MiB)
    assert dmemfs(config).page_size() == 2 * MiB


def test_page_size_falls_back_to_config_without_debugfs(tmp_path: Path) -> None:
    config = load_static_host("no-debugfs", tmp_path)
    assert dmemfs(config).page_size() == 2 * MiB


def test_unknown_page_size_says_how_to_find_it(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, debugfs=False)
    with pytest.raises(HostError) as caught:
        dmemfs(config).page_size()
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
        return DMEMFS_MAGIC, GiB

    monkeypatch.setattr(host_module, "statfs", dmemfs_statfs)
    assert dmemfs(config).page_size() == GiB
    assert seen == [config.dmemfs.mount]


def test_statfs_page_size_contradicting_config_names_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_host(tmp_path, 1, debugfs=False, page_size=4 * KiB)
    monkeypatch.setattr(host_module, "statfs", lambda path: (DMEMFS_MAGIC, 2 * MiB))
    with pytest.raises(HostError, match=r"page_size is 4 KiB but statfs\(.*/dmem\) says 2 MiB"):
        dmemfs(config).page_size()


def test_page_size_outside_4k_2m_1g_is_refused(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, page_shift=16)
    with pytest.raises(HostError, match="dpage_shift gives a dmem page size of 65536 bytes"):
        dmemfs(config).page_size()
    with pytest.raises(HostError, match="page_size 3145728 bytes is not a dmem page size"):
        dmemfs(make_host(tmp_path / "b", 1, page_size=3 * MiB)).page_size()


def test_malformed_dpage_shift_quotes_file_and_text(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1)
    path = write_debugfs(config, "dpage_shift", "21 pages\n")
    with pytest.raises(HostError) as caught:
        dmemfs(config).page_size()
    assert caught.value.line() == f"dmem-libvirt: cannot parse {path}: '21 pages\\n' is not a decimal number"


# ---- dmem pools -------------------------------------------------------------------------------


def test_pools_are_debugfs_counts_times_the_page_size(tmp_path: Path) -> None:
    host = dmemfs(load_static_host("two-nodes", tmp_path))
    assert host.debugfs_available()
    assert host.pools() == {0: Pool(0, 48 * GiB, 40 * GiB), 1: Pool(1, 48 * GiB, 48 * GiB)}


def test_pools_with_4k_pages_on_an_asymmetric_host(tmp_path: Path) -> None:
    pools = dmemfs(load_static_host("asymmetric", tmp_path)).pools()
    assert pools == {0: Pool(0, 64 * GiB, 60 * GiB), 1: Pool(1, 16 * GiB, 4 * GiB),
                     2: Pool(2, 48 * GiB, 48 * GiB)}


def test_pools_with_1g_pages_on_eight_nodes(tmp_path: Path) -> None:
    pools = dmemfs(load_static_host("eight-nodes", tmp_path)).pools()
    assert [pool.free for pool in pools.values()] == [(48 - n) * GiB for n in range(8)]
    assert all(pool.total == 48 * GiB for pool in pools.values())


def test_nodes_without_dmem_have_no_pool(tmp_path: Path) -> None:
    host = dmemfs(load_static_host("partial-dmem", tmp_path))
    assert host.host.online_nodes() == [0, 1, 2, 3]
    assert sorted(host.pools()) == [1, 3]
    assert host.pools()[3] == Pool(3, 32 * GiB, 32 * GiB)


def test_pools_follow_the_kernels_free_count(tmp_path: Path) -> None:
    config = load_static_host("four-nodes", tmp_path)
    host = dmemfs(config)
    assert host.pools()[2].free == 80 * GiB
    set_free(config, 2, 512)
    assert host.pools()[2].free == GiB
    assert (config.dmemfs.debugfs / "free_dpages").read_text() == f"{49152 + 45056 + 512 + 36864}\n"


def test_malformed_free_count_quotes_file_and_text(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2)
    path = write_debugfs(config, "node1/free_dpages", "abc\n")
    with pytest.raises(HostError) as caught:
        dmemfs(config).pools()
    assert caught.value.line() == f"dmem-libvirt: cannot parse {path}: 'abc\\n' is not a decimal number"


@pytest.mark.parametrize("text", ["", "-1\n", "12 \n", "0x10\n", "1\n2\n"])
def test_counts_must_be_one_decimal_number(tmp_path: Path, text: str) -> None:
    config = make_host(tmp_path, 1)
    write_debugfs(config, "node0/total_dpages", text)
    with pytest.raises(HostError, match="is not a decimal number"):
        dmemfs(config).pools()


def test_free_above_total_is_refused_with_both_counts(tmp_path: Path) -> None:
    config = make_host(tmp_path, {0: FakeNode(dmem_total=2 * GiB)})
    set_free(config, 0, 2000)
    with pytest.raises(HostError, match="reports 2000 free dmem pages of 1024 total"):
        dmemfs(config).pools()


def test_pools_before_the_first_mount_say_to_mount_dmemfs(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2, page_shift=None)
    with pytest.raises(HostError) as caught:
        dmemfs(config).pools()
    line = caught.value.line()
    assert "dmemfs has not been mounted since boot" in line
    assert f"mount -t dmemfs none -o pagesize=2M {config.dmemfs.mount}" in line


def test_missing_node_counter_names_the_file(tmp_path: Path) -> None:
    config = make_host(tmp_path, 2)
    missing = config.dmemfs.debugfs / "node1" / "free_dpages"
    missing.unlink()
    with pytest.raises(HostError, match=f"cannot read {missing}: no such file"):
        dmemfs(config).pools()


def test_without_debugfs_pools_are_the_configured_capacity(tmp_path: Path) -> None:
    host = dmemfs(load_static_host("no-debugfs", tmp_path))
    assert not host.debugfs_available()
    assert host.pools() == {0: Pool(0, 40 * GiB, 40 * GiB), 1: Pool(1, 24 * GiB, 24 * GiB)}


def test_without_debugfs_or_capacity_pools_name_both_fixes(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, debugfs=False)
    with pytest.raises(HostError) as caught:
        dmemfs(config).pools()
    line = caught.value.line()
    assert str(config.dmemfs.debugfs) in line
    assert "mount -t debugfs none /sys/kernel/debug" in line
    assert "[dmemfs.capacity]" in line


def test_debugfs_counts_win_over_configured_capacity(tmp_path: Path) -> None:
    config = make_host(tmp_path, {0: FakeNode(dmem_total=4 * GiB, dmem_free=GiB)}, capacity={0: 8 * GiB})
    assert dmemfs(config).pools() == {0: Pool(0, 4 * GiB, GiB)}


