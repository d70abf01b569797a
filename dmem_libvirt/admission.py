"""Admission: how much room each host node has for one domain, given the pools and the ledger.

A node's room is the tighter of two views, so that neither a lagging kernel count nor a leaked file can
double-book a page: (kernel free - reservations still in flight, i.e. recorded but not yet faulted) and
(pool total - everything the ledger holds).  Both feed `placement.place`, whose refusal names the
numbers and the domains holding them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .placement import CellNeed, NodeRoom

if TYPE_CHECKING:
    from .backends import Pool
    from .domain import DomainMemory
    from .ledger import Reservation


def held_by_domain(entries: Iterable[Reservation]) -> tuple[tuple[str, int], ...]:
    totals: dict[str, int] = defaultdict(int)
    for entry in entries:
        totals[entry.domain] += entry.bytes
    return tuple(sorted(totals.items()))


def node_rooms(
    pools: Mapping[int, Pool],
    held: Sequence[Reservation],
    node_cpus: Mapping[int, frozenset[int]],
    *,
    except_uuid: str | None = None,
) -> list[NodeRoom]:
    """One NodeRoom per node with a pool, excluding what ``except_uuid`` itself holds."""
    rooms = []
    others = [r for r in held if r.uuid != except_uuid]
    for node in sorted(pools):
        pool = pools[node]
        on_node = [r for r in others if r.node == node]
        in_flight = [r for r in on_node if r.state == "reserved"]
        kernel_view = pool.free - sum(r.bytes for r in in_flight)
        ledger_view = pool.total - sum(r.bytes for r in on_node)
        if kernel_view <= ledger_view:
            room = NodeRoom(node, pool.free, held_by_domain(in_flight), node_cpus.get(node, frozenset()))
        else:
            room = NodeRoom(node, pool.total, held_by_domain(on_node), node_cpus.get(node, frozenset()))
        rooms.append(room)
    return rooms


def cell_needs(dom: DomainMemory) -> list[CellNeed]:
    """What each guest cell (one entry for a cell-less guest) asks of the host, from the metadata."""
    from .domain import backing_files, cell_host_cpus

    return [
        CellNeed(placed.cell, placed.size, cell_host_cpus(dom, placed.cell))
        for placed in backing_files(dom)
    ]
