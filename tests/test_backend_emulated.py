"""The emulated dmemfs counts pages per file, as the kernel does: a page comes back once its file is gone.

Whatever removed the file and whatever was interrupted on the way (a hook killed between writing its
accounts and the counters), the next reader sees the counts the kernel would show; a pool the kernel (here
whoever writes the counters) shrinks or grows is followed; unreadable accounts never block a guest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakehost import free_pages, make_host

from dmem_libvirt.backends.emulated import ACCOUNTS
from dmem_libvirt.config import Config
from dmem_libvirt.errors import PinError
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import MiB


@pytest.fixture
def host(tmp_path: Path) -> Config:
    config = make_host(tmp_path / "host", nodes=2, emulate=True)
    assert (free_pages(config, 0), free_pages(config, 1)) == (4096, 4096)
    return config


def pinned(config: Config, name: str, node: int, size: int) -> Path:
    path = config.dmemfs.mount / name
    path.touch()
    HookContext.create(config).backend.allocated("web01", path, node, size)
    return path


def read_pools(config: Config) -> dict[int, int]:
    return {node: pool.free // (2 * MiB) for node, pool in HookContext.create(config).backend.pools().items()}


def test_pages_come_back_when_the_file_is_gone_whoever_removed_it(host: Config) -> None:
    first = pinned(host, "a.ram", 0, 16 * MiB)
    pinned(host, "b.ram", 1, 6 * MiB)
    assert read_pools(host) == {0: 4088, 1: 4093}
    first.unlink()  # not through the hook: libvirt, an operator, a hook killed before it said so
    assert read_pools(host) == {0: 4096, 1: 4093}
    assert free_pages(host, 0) == 4096


def test_a_file_recreated_at_the_same_path_is_another_file(host: Config) -> None:
    path = pinned(host, "a.ram", 0, 16 * MiB)
    # The new file exists before the old one goes: it cannot be handed the old inode number again,
    # which a disk filesystem may do after an unlink.
    replacement = path.with_name("a.ram.new")
    replacement.touch()
    replacement.replace(path)
    assert read_pools(host)[0] == 4096


def test_a_pin_the_node_cannot_hold_is_refused_and_counts_nothing(host: Config) -> None:
    pinned(host, "a.ram", 0, 8000 * MiB)
    with pytest.raises(PinError) as refused:
        pinned(host, "b.ram", 0, 256 * MiB)
    assert str(refused.value) == ("dmem-libvirt: web01: host node 0 has 192.0 MiB of 2 MiB dmem pages free, "
                                  "pinning needs 256.0 MiB")
    assert read_pools(host)[0] == 96


def test_counters_left_unwritten_by_a_killed_process_are_completed_not_taken_for_the_kernels(host: Config) -> None:
    pinned(host, "a.ram", 0, 16 * MiB)
    # Killed after the accounts were replaced, before the counter: it still shows the free count before.
    (host.dmemfs.debugfs / "node0" / "free_dpages").write_text("4096\n")
    assert read_pools(host)[0] == 4088
    assert free_pages(host, 0) == 4088


def test_a_pool_the_kernel_shrinks_is_followed_and_pinned_pages_still_come_back(host: Config) -> None:
    path = pinned(host, "a.ram", 0, 16 * MiB)
    (host.dmemfs.debugfs / "node0" / "free_dpages").write_text("4000\n")  # 88 pages retired by the kernel
    assert read_pools(host)[0] == 4000
    path.unlink()
    assert read_pools(host)[0] == 4008


def test_unreadable_accounts_start_afresh_keeping_what_is_taken_taken(host: Config) -> None:
    pinned(host, "a.ram", 0, 16 * MiB)
    (host.dmemfs.debugfs / ACCOUNTS).write_text("{not json")
    assert read_pools(host)[0] == 4088
    pinned(host, "b.ram", 0, 16 * MiB)
    assert read_pools(host)[0] == 4080
