"""Placement: which host NUMA node backs each guest cell, or one line saying why no node can.

Pure logic on byte counts, nothing read from the host.  Never over-commits a node: cells cost whole pages,
a node offers whole pages of (free - reserved by others).  Deterministic, independent of the order of
``nodes``; finds a fit whenever one exists up to 8 nodes x 8 cells, beyond that within SEARCH_BUDGET.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import PlacementError
from .units import format_page_size, format_size

Policy = Literal["best-fit", "first-fit", "worst-fit"]
POLICIES: tuple[Policy, ...] = ("best-fit", "first-fit", "worst-fit")
# Policy: best-fit (the tightest node that fits), chosen with bench/placement.py: 10,000-guest
# arrival/departure streams on 4-8 node hosts at 1.1x offered load, 10 seeds per size mix, fraction of
# guests / of requested memory admitted (sd over seeds ~0.01 / ~0.02-0.04, differences are paired):
#   small mix: best-fit 0.927 / 0.831, first-fit 0.929 / 0.829, worst-fit 0.930 / 0.806
#   large mix: best-fit 0.865 / 0.688, first-fit 0.866 / 0.682, worst-fit 0.850 / 0.628
# Best-fit keeps big holes for big guests: it admits the most memory (+0.3 and +0.65 points over
# first-fit) for 0.1-0.2 points fewer, mostly small, guests; worst-fit fragments the large mix.
DEFAULT_POLICY: Policy = "best-fit"

EXACT_NODES = 8
EXACT_CELLS = 8
# Search states visited beyond EXACT_NODES x EXACT_CELLS before giving up: ~12 us each on 64 nodes, so
# a 64x16 request that no bound refuses early costs ~50 ms (bench/placement.py), not minutes.
SEARCH_BUDGET = 4000


@dataclass(frozen=True)
class CellNeed:
    """What one guest NUMA cell (cell 0 for a guest without cells) asks of the host."""

    cell: int
    size: int  # bytes; a size that is not a page multiple costs the next whole page
    cpus: frozenset[int] = frozenset()  # host CPUs its vCPUs are pinned to; empty = not pinned


@dataclass(frozen=True)
class NodeRoom:
    """One host node's dmem pool as placement sees it."""

    node: int
    free: int  # bytes free in the node's pool (kernel/backend view)
    reserved: tuple[tuple[str, int], ...] = ()  # (domain, bytes) held by other domains, not yet in `free`
    cpus: frozenset[int] = frozenset()  # host CPUs local to this node
    note: str = ""  # how the backend came to ``free`` (a pool that may grow), said in refusals

    @property
    def reserved_total(self) -> int:
        return sum(size for _, size in self.reserved)

    @property
    def available(self) -> int:
        """Bytes a new guest may take: free minus reserved, never negative (not rounded to pages)."""
        return max(0, self.free - self.reserved_total)


def pages_for(size: int, page_size: int) -> int:
    """Whole pages that ``size`` bytes occupy."""
    return -(-size // page_size)


def room_pages(room: NodeRoom, page_size: int) -> int:
    """Whole pages a node can still give."""
    return room.available // page_size


def place(
    domain: str,
    cells: Sequence[CellNeed],
    nodes: Sequence[NodeRoom],
    page_size: int,
    *,
    fixed: Mapping[int, int] | None = None,
    cellless: bool = False,
    policy: Policy = DEFAULT_POLICY,
    kind: str = "dmem",
) -> dict[int, int]:
    """Guest cell id -> host node.  Raises PlacementError(message, domain) when nothing fits.

    ``fixed`` cells must go to their node (checked, never moved); the others are placed freely, nearest
    to their pinned CPUs when that fits.  ``cellless``: the guest has no NUMA cells, so everything goes
    to one node.  ``kind`` names the pages in refusals ("dmem", "huge").
    """
    if page_size <= 0:
        raise ValueError(f"page size must be positive, got {page_size}")
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; expected one of {', '.join(POLICIES)}")
    rooms = _sorted_rooms(nodes)
    needs = sorted(cells, key=lambda need: need.cell)
    if len({need.cell for need in needs}) != len(needs):
        raise ValueError(f"duplicate guest cell ids in {[need.cell for need in needs]}")
    ids = {need.cell for need in needs}
    kept = {cell: node for cell, node in sorted((fixed or {}).items()) if cell in ids}
    problem = _Problem(domain, needs, rooms, page_size, kept, cellless, policy, kind)
    problem.check_nodes_exist()
    if cellless:
        return problem.place_together()
    return problem.place_cells()


def _sorted_rooms(nodes: Sequence[NodeRoom]) -> list[NodeRoom]:
    rooms = sorted(nodes, key=lambda room: room.node)
    numbers = [room.node for room in rooms]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"duplicate host node numbers in {numbers}")
    return rooms


class _Exhausted(Exception):
    """The bounded search ran out of budget."""


class _Problem:
    """One placement request, in pages, with nodes indexed 0..n-1 in node-number order."""

    def __init__(self, domain: str, needs: list[CellNeed], rooms: list[NodeRoom], page_size: int,
                 fixed: dict[int, int], cellless: bool, policy: Policy, kind: str) -> None:
        self.domain = domain
        self.kind = kind
        self.needs = needs
        self.rooms = rooms
        self.page_size = page_size
        self.fixed = fixed
        self.cellless = cellless
        self.policy = policy
        self.index = {room.node: i for i, room in enumerate(rooms)}
        self.caps = [room_pages(room, page_size) for room in rooms]
        self.pages = {need.cell: pages_for(need.size, page_size) for need in needs}
        self.budget_hit = False

    # -- checks on the request ------------------------------------------------------------------------

    def check_nodes_exist(self) -> None:
        for cell, node in self.fixed.items():
            if node not in self.index:
                known = ", ".join(str(room.node) for room in self.rooms) or "none"
                who = "guest is" if self.cellless else f"guest cell {cell} is"
                raise PlacementError(f"{who} to be placed on host node {node}, which has no {self.kind} pool "
                                     f"(host nodes with {self.kind}: {known})", self.domain)

    # -- a guest without NUMA cells: one node for everything -------------------------------------------

    def place_together(self) -> dict[int, int]:
        total = sum(self.pages.values())
        wanted = sorted(set(self.fixed.values()))
        if len(wanted) > 1:
            raise PlacementError(f"guest has no NUMA cells, so it needs one host node; asked for nodes "
                                 f"{', '.join(map(str, wanted))}", self.domain)
        if wanted:
            j = self.index[wanted[0]]
            if self.caps[j] < total:
                raise PlacementError(f"guest needs {self._bytes(total)} of {self._page()} {self.kind} pages on "
                                     f"host node {wanted[0]}; {_room_text(self.rooms[j])}", self.domain)
            node = wanted[0]
        else:
            cpus = frozenset().union(*(need.cpus for need in self.needs))
            order = self._candidates(total, cpus, self.caps)
            if not order:
                rooms = "; ".join(f"node {room.node}: {_room_text(room)}" for room in self.rooms)
                raise PlacementError(f"guest needs {self._bytes(total)} of {self._page()} {self.kind} pages on one "
                                     f"host node; {rooms or f'no host node has a {self.kind} pool'}", self.domain)
            node = self.rooms[order[0]].node
        return {need.cell: node for need in self.needs}

    # -- a guest with NUMA cells ------------------------------------------------------------------------

    def place_cells(self) -> dict[int, int]:
        caps = list(self.caps)
        on_node: dict[int, list[int]] = {}
        for cell, node in self.fixed.items():
            on_node.setdefault(node, []).append(cell)
        refusals = []
        for node, fixed_cells in sorted(on_node.items()):
            j = self.index[node]
            load = sum(self.pages[cell] for cell in fixed_cells)
            if load > caps[j]:
                refusals.append(self._fixed_refusal(fixed_cells, node, load))
            caps[j] -= load
        if refusals:
            raise PlacementError("; ".join(refusals), self.domain)
        free = [need for need in self.needs if need.cell not in self.fixed]
        # Pinned cells choose first so locality is not lost to packing; largest first packs best.
        order = sorted(free, key=lambda need: (not need.cpus, -self.pages[need.cell], need.cell))
        found = self._greedy(order, caps)
        if found is None:
            found = self._search(free, caps)
        if found is None:
            raise PlacementError(self._free_refusal(free), self.domain)
        result = dict(self.fixed)
        result.update(found)
        return dict(sorted(result.items()))

    def _greedy(self, order: list[CellNeed], caps: list[int]) -> dict[int, int] | None:
        caps = list(caps)
        chosen = {}
        for need in order:
            size = self.pages[need.cell]
            fits = self._candidates(size, need.cpus, caps)
            if not fits:
                return None
            caps[fits[0]] -= size
            chosen[need.cell] = self.rooms[fits[0]].node
        return chosen

    def _search(self, free: list[CellNeed], start: list[int]) -> dict[int, int] | None:
        """Depth-first over cells, largest first, with two facts that keep it small.

        Whether the remaining cells fit depends only on the multiset of remaining capacities, each
        clipped to the remaining need, ignoring nodes smaller than the smallest remaining cell: so nodes
        with equal clipped room are interchangeable (try one), and a multiset that failed fails again.
        """
        order = sorted(free, key=lambda need: (-self.pages[need.cell], not need.cpus, need.cell))
        sizes = [self.pages[need.cell] for need in order]
        suffix = [sum(sizes[k:]) for k in range(len(sizes) + 1)]
        smallest = sizes[-1] if sizes else 0
        exact = len(self.rooms) <= EXACT_NODES and len(order) <= EXACT_CELLS
        budget = [SEARCH_BUDGET]
        caps = list(start)
        chosen = [0] * len(order)
        failed: set[tuple[int, tuple[int, ...]]] = set()

        def fits_from(k: int) -> bool:
            if k == len(order):
                return True
            rest = suffix[k]
            useful = sorted(min(cap, rest) for cap in caps if cap >= smallest)
            if sum(useful) < rest:
                return False
            key = (k, tuple(useful))
            if key in failed:
                return False
            if not exact:
                budget[0] -= 1
                if budget[0] < 0:
                    raise _Exhausted
            tried: set[int] = set()
            for j in self._candidates(sizes[k], order[k].cpus, caps):
                clipped = min(caps[j], rest)
                if clipped in tried:
                    continue
                tried.add(clipped)
                caps[j] -= sizes[k]
                chosen[k] = j
                if fits_from(k + 1):
                    return True
                caps[j] += sizes[k]
            failed.add(key)
            return False

        try:
            if not fits_from(0):
                return None
        except _Exhausted:
            self.budget_hit = True
            return None
        return {need.cell: self.rooms[j].node for need, j in zip(order, chosen, strict=True)}

    def _candidates(self, size: int, cpus: frozenset[int], caps: list[int]) -> list[int]:
        """Node indexes with room for ``size`` pages, most local first, then by policy, then by number."""
        rank = []
        for j, cap in enumerate(caps):
            if cap < size:
                continue
            local = len(cpus & self.rooms[j].cpus) if cpus else 0
            if self.policy == "best-fit":
                fit = cap - size
            elif self.policy == "worst-fit":
                fit = size - cap
            else:
                fit = 0
            rank.append((-local, fit, j))
        rank.sort()
        return [j for _, _, j in rank]

    # -- messages ---------------------------------------------------------------------------------------

    def _bytes(self, pages: int) -> str:
        return format_size(pages * self.page_size)

    def _page(self) -> str:
        return format_page_size(self.page_size)

    def _fixed_refusal(self, cells: list[int], node: int, load: int) -> str:
        room = self.rooms[self.index[node]]
        if len(cells) == 1:
            need = f"guest cell {cells[0]} needs {self._bytes(load)}"
        else:
            sizes = " + ".join(self._bytes(self.pages[cell]) for cell in cells)
            need = f"guest cells {_and(cells)} need {sizes}"
        return f"{need} of {self._page()} {self.kind} pages on host node {node}; {_room_text(room)}"

    def _free_refusal(self, free: list[CellNeed]) -> str:
        sizes = " + ".join(self._bytes(self.pages[need.cell]) for need in free)
        if len(free) == 1:
            need = f"guest cell {free[0].cell} needs {sizes}"
        elif self.fixed:
            need = f"guest cells {_and([n.cell for n in free])} need {sizes}"
        else:
            need = f"guest cells need {sizes}"
        text = f"{need} of {self._page()} {self.kind} pages"
        if self.fixed:
            fixed = ", ".join(f"cell {cell} ({self._bytes(self.pages[cell])}) on node {node}"
                              for cell, node in self.fixed.items())
            text += f" besides {fixed}"
        verdict = "no placement found within the search limit" if self.budget_hit else "no placement fits"
        if not self.rooms:
            return f"{text}; no host node has a {self.kind} pool"
        nodes = ", ".join(_node_text(room) for room in self.rooms)
        return f"{text}; {verdict}: {nodes}"


def _and(items: Sequence[int]) -> str:
    words = [str(item) for item in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _held_text(room: NodeRoom) -> str:
    """'1.5 GiB reserved by db02' or '2.0 GiB reserved by db02 (1.5 GiB) and web03 (512.0 MiB)'."""
    held = [(name, size) for name, size in room.reserved if size > 0]
    if not held:
        return ""
    total = format_size(sum(size for _, size in held))
    if len(held) == 1:
        return f"{total} reserved by {held[0][0]}"
    names = [f"{name} ({format_size(size)})" for name, size in held]
    return f"{total} reserved by " + ", ".join(names[:-1]) + " and " + names[-1]


def _room_text(room: NodeRoom) -> str:
    """'2.0 GiB free, 1.5 GiB reserved by db02' (fixed-node form)."""
    held = _held_text(room)
    note = f"; {room.note}" if room.note else ""
    return f"{format_size(room.free)} free" + (f", {held}" if held else "") + note


def _node_text(room: NodeRoom) -> str:
    """'node 0 6.0 GiB free (1.5 GiB reserved by db02)' (one entry of a node list)."""
    details = "; ".join(text for text in (_held_text(room), room.note) if text)
    return f"node {room.node} {format_size(room.free)} free" + (f" ({details})" if details else "")
