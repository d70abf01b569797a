"""A guest of the hugetlbfs backend migrates between the two sandbox hosts, on this machine's real pools.

Both hosts share one kernel, so they share its hugepage pools: the destination grows node 0's pool by the
guest's pages while the source still holds its own, and the source gives back exactly the pages it grew once
the guest left.  The pools are host-global: held under the machine-wide lock of the tests that change them,
recorded before and written back after, also on failure.
"""

from __future__ import annotations

from collections.abc import Iterator

import hostpools
import pytest
from hostpools import PAGE, HostPools, pool

from dmem_libvirt.units import GiB, MiB

from .test_hook_e2e import domstate, reservations_of
from .test_migration import LIVE, clear, wait_holding
from sandbox import Sandbox, guest_xml


@pytest.fixture
def huge_hosts(sandbox: Sandbox, peer: Sandbox) -> Iterator[tuple[Sandbox, Sandbox, int]]:
    """Both hosts on the hugetlbfs backend, each allowed to grow node 0's pool by 1 GiB; node 0's pool size."""
    with hostpools.exclusive():
        before = HostPools.take()
        base = pool()[0]
        try:
            for box in (sandbox, peer):
                box.use_config(box.hugetlbfs_config({0: base * PAGE + GiB}))
            yield sandbox, peer, base
        finally:
            try:
                for box in (sandbox, peer):
                    clear(box)
                    box.use_config(box.emulated_config())
            finally:
                before.restore()


def test_hugetlbfs_guest_migrates_onto_pages_the_destination_grew_and_the_source_gives_its_own_back(
        huge_hosts: tuple[Sandbox, Sandbox, int]) -> None:
    source, destination, base = huge_hosts
    source.define(guest_xml("h-mover", 128 * MiB, domain_type=source.domain_type, cells=(128 * MiB,)))
    source.dmem("enable", "h-mover", "--nodes", "0")
    source.virsh("start", "h-mover")
    assert pool()[0] == base + 64
    source.migrate("h-mover", destination, *LIVE)
    assert domstate(destination, "h-mover") == "running"
    held = [(r["state"], r["bytes"], r["pid"]) for r in reservations_of(destination, "h-mover")]
    assert held == [("pinned", 128 * MiB, destination.qemu_pid("h-mover"))]
    wait_holding(source, [])
    # The source shrank the pool by what it had grown; the destination's growth holds the guest now.
    assert pool()[0] == base + 64
    destination.virsh("destroy", "h-mover")
    wait_holding(destination, [])
    assert pool()[0] == base
