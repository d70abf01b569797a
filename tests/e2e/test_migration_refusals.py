"""Migrations a destination must refuse: it says why in one line through `virsh migrate`, books nothing, and
the guest keeps running on its source exactly as it was.  One guest serves every case."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dmem_libvirt.units import KiB, MiB

from .conftest import PEER_PER_NODE, PEER_USED
from .test_hook_e2e import domstate, hook_line
from .test_migration import (
    LIVE,
    P2P,
    assert_balanced,
    assert_empty,
    clear,
    defined_names,
    snapshot,
    start_enabled,
    wait_holding,
)
from sandbox import Sandbox, guest_xml


@pytest.fixture(scope="module")
def resident(sandbox: Sandbox, peer: Sandbox) -> Iterator[str]:
    """One guest running on the first host for every refusal test (none of them may change it)."""
    for box in (sandbox, peer):
        assert_empty(box)
    start_enabled(sandbox, "stayer")
    yield "stayer"
    clear(sandbox)
    wait_holding(sandbox, [])


def _full(destination: Sandbox) -> str:
    destination.set_pool(PEER_PER_NODE, PEER_PER_NODE - 128 * MiB)
    return "guest needs 256.0 MiB of 2 MiB dmem pages on one host node; node 0: 128.0 MiB free"


def _other_page_size(destination: Sandbox) -> str:
    destination.set_pool(PEER_PER_NODE, PEER_USED, 4 * KiB)
    return "defined for 2 MiB pages but host dmemfs uses 4 KiB pages; migrate it to a host with 2 MiB dmemfs pages"


@pytest.mark.parametrize(("flags", "make_refuse"), [(LIVE, _full), (P2P, _full), (LIVE, _other_page_size)],
                         ids=["full-live", "full-p2p", "other-page-size"])
def test_destination_that_cannot_take_the_guest_refuses_with_its_line_and_the_source_keeps_it(
        sandbox: Sandbox, peer: Sandbox, resident: str, flags: tuple[str, ...],
        make_refuse: Callable[[Sandbox], str]) -> None:
    before = snapshot(sandbox, resident)
    try:
        why = make_refuse(peer)
        refused = sandbox.migrate(resident, peer, *flags, check=False)
    finally:
        peer.set_pool(PEER_PER_NODE, PEER_USED)
    assert refused.returncode == 1
    assert hook_line(refused.stderr) == f"dmem-libvirt: {resident}: {why}"
    assert domstate(sandbox, resident) == "running" and snapshot(sandbox, resident) == before
    assert_balanced(sandbox)
    assert defined_names(peer) == []
    assert_empty(peer)


def test_destination_that_turns_the_guest_away_after_its_hook_agreed_keeps_nothing_booked(
        sandbox: Sandbox, peer: Sandbox, resident: str) -> None:
    before = snapshot(sandbox, resident)
    # Another guest of that name (another UUID) is defined there: libvirt refuses the incoming one after
    # `migrate begin` said yes, and runs no other hook on the destination.
    peer.define(guest_xml(resident, 256 * MiB, domain_type=peer.domain_type))
    try:
        refused = sandbox.migrate(resident, peer, *LIVE, check=False)
    finally:
        peer.virsh("undefine", resident)
    assert refused.returncode == 1 and "already" in refused.stderr, refused.stderr
    assert snapshot(sandbox, resident) == before
    assert_empty(peer)
