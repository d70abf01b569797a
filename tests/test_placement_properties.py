"""Placement properties on random hosts and guests, checked against a brute-force search."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from dmem_libvirt.errors import PlacementError
from dmem_libvirt.placement import POLICIES, CellNeed, NodeRoom, Policy, place
from dmem_libvirt.units import KiB, MiB

# About 5 s for the whole file on a small machine.
FAST = settings(max_examples=150, deadline=None)
BRUTE = settings(max_examples=300, deadline=None)


@dataclass(frozen=True)
class Request:
    cells: list[CellNeed]
    nodes: list[NodeRoom]
    page: int


@st.composite
def requests(draw: st.DrawFn, max_nodes: int = 6, max_cells: int = 6) -> Request:
    page = draw(st.sampled_from([4 * KiB, 2 * MiB]))
    ids = draw(st.lists(st.integers(0, 15), min_size=1, max_size=max_nodes, unique=True))
    nodes = []
    for node in ids:
        # Room and reservations off the page grid on purpose: placement must round them down.
        free = draw(st.integers(0, 12)) * page + draw(st.sampled_from([0, 0, 1, page // 2, page - 1]))
        held = draw(st.lists(st.tuples(st.sampled_from(["db02", "web03"]), st.integers(0, 3 * page)),
                             max_size=2))
        nodes.append(NodeRoom(node, free, tuple(held), frozenset({2 * node, 2 * node + 1})))
    count = draw(st.integers(1, max_cells))
    cells = []
    for cell in range(count):
        size = max(0, draw(st.integers(0, 7)) * page - draw(st.sampled_from([0, 0, 1, page // 3])))
        cpus = draw(st.frozensets(st.integers(0, 31), max_size=3))
        cells.append(CellNeed(cell, size, cpus))
    return Request(cells, nodes, page)


@st.composite
def tight_requests(draw: st.DrawFn) -> Request:
    """Cells cut from the nodes' own room (a packing exists), shuffled, one maybe grown by a page."""
    page = draw(st.sampled_from([4 * KiB, 2 * MiB]))
    nodes: list[NodeRoom] = []
    sizes: list[int] = []
    for node in range(draw(st.integers(2, 5))):
        pieces = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))[: 6 - len(sizes)]
        nodes.append(NodeRoom(node, sum(pieces) * page + draw(st.sampled_from([0, 1, page - 1]))))
        sizes.extend(pieces)
    sizes = draw(st.permutations(sizes))
    if draw(st.booleans()):
        sizes[0] += 1
    return Request([CellNeed(cell, size * page) for cell, size in enumerate(sizes)], nodes, page)


any_requests = st.one_of(requests(), tight_requests())


def pages(size: int, page: int) -> int:
    return -(-size // page)


def whole_page_room(room: NodeRoom, page: int) -> int:
    return max(0, room.free - sum(size for _, size in room.reserved)) // page


def brute_force_fits(req: Request, fixed: Mapping[int, int] | None = None) -> bool:
    """Tries every assignment of cells to nodes (itertools.product)."""
    caps = [whole_page_room(room, req.page) for room in req.nodes]
    numbers = [room.node for room in req.nodes]
    sizes = [pages(cell.size, req.page) for cell in req.cells]
    for assignment in itertools.product(range(len(req.nodes)), repeat=len(req.cells)):
        if fixed and any(numbers[j] != fixed[cell.cell]
                         for cell, j in zip(req.cells, assignment, strict=True) if cell.cell in fixed):
            continue
        load = [0] * len(caps)
        for size, j in zip(sizes, assignment, strict=True):
            load[j] += size
        if all(used <= cap for used, cap in zip(load, caps, strict=True)):
            return True
    return False


def attempt(req: Request, nodes: Sequence[NodeRoom] | None = None, **kwargs: object) -> dict[int, int] | None:
    try:
        return place("guest", req.cells, req.nodes if nodes is None else nodes, req.page,
                     **kwargs)  # type: ignore[arg-type]
    except PlacementError as err:
        assert err.domain == "guest"
        assert "\n" not in err.line()
        return None


@FAST
@given(any_requests)
def test_placement_never_puts_more_whole_pages_on_a_node_than_it_has(req: Request) -> None:
    result = attempt(req)
    if result is None:
        return
    assert set(result) == {cell.cell for cell in req.cells}
    for room in req.nodes:
        used = sum(pages(cell.size, req.page) for cell in req.cells if result[cell.cell] == room.node)
        assert used * req.page <= room.available
        assert used <= whole_page_room(room, req.page)


@BRUTE
@given(any_requests, st.sampled_from(POLICIES))
def test_placement_is_found_exactly_when_brute_force_finds_one(req: Request, policy: Policy) -> None:
    assert (attempt(req, policy=policy) is not None) == brute_force_fits(req)


@BRUTE
@given(any_requests, st.data())
def test_fixed_cells_stay_put_and_the_rest_fit_whenever_brute_force_fits(
    req: Request, data: st.DataObject
) -> None:
    numbers = [room.node for room in req.nodes]
    chosen = data.draw(st.lists(st.sampled_from([cell.cell for cell in req.cells]), unique=True))
    fixed = {cell: data.draw(st.sampled_from(numbers)) for cell in chosen}
    result = attempt(req, fixed=fixed)
    assert (result is not None) == brute_force_fits(req, fixed)
    if result is not None:
        assert all(result[cell] == node for cell, node in fixed.items())


@FAST
@given(any_requests, st.randoms(use_true_random=False))
def test_same_request_gives_the_same_answer_in_any_node_order(req: Request, rng: object) -> None:
    first = attempt(req)
    assert attempt(req) == first
    shuffled = list(req.nodes)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert attempt(req, shuffled) == first


@FAST
@given(any_requests)
def test_pinned_cpus_never_turn_a_fit_into_a_refusal(req: Request) -> None:
    unpinned = Request([replace(cell, cpus=frozenset()) for cell in req.cells], req.nodes, req.page)
    assert (attempt(req) is None) == (attempt(unpinned) is None)


@FAST
@given(requests(max_cells=3))
def test_guest_without_cells_goes_whole_to_one_node_that_has_room(req: Request) -> None:
    result = attempt(req, cellless=True)
    total = sum(pages(cell.size, req.page) for cell in req.cells)
    room_by_node = {room.node: whole_page_room(room, req.page) for room in req.nodes}
    assert (result is not None) == any(room >= total for room in room_by_node.values())
    if result is not None:
        assert len(set(result.values())) == 1
        assert room_by_node[next(iter(result.values()))] >= total
