"""Define time: turn a domain's XML into one whose RAM lives on the backend, and back.

`plan` parses (hardened), refuses what cannot be backed, makes cell sizes page multiples, chooses host
nodes against the pools and what other domains hold in the ledger, and rewrites a copy of the tree.
It never defines anything: the CLI decides whether to print, diff or define the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import domxml
from .domain import DomainMemory, aligned_sizes, cell_host_cpus, read_domain, unsupported
from .errors import DomainXMLError, PlacementError
from .placement import CellNeed, NodeRoom, place


@dataclass(frozen=True)
class Plan:
    name: str
    page_size: int
    needs: tuple[CellNeed, ...]
    rooms: tuple[NodeRoom, ...]      # empty when placing offline without pool data
    placement: dict[int, int]         # guest cell (0 for a cell-less guest) -> host node
    original: bytes
    rewritten: bytes
    warnings: tuple[str, ...]
    encoding: str = "UTF-8"          # of ``original`` and ``rewritten``, as the document declares it
    kind: str = "dmem"               # how the pages are named: "dmem", or "huge" on hugetlbfs

    @property
    def changed(self) -> bool:
        """True when defining ``rewritten`` would change the domain (libvirt's quoting aside)."""
        return self.original != self.rewritten and domxml.canonical(self.original) != domxml.canonical(self.rewritten)


def needs_of(dom: DomainMemory, page_size: int, *, round_up: bool) -> list[CellNeed]:
    """Per guest cell (one entry, cell 0, for a guest without cells): page-aligned size and pinned CPUs."""
    sizes = aligned_sizes(dom, page_size, round_up=round_up)
    ids = [cell.id for cell in dom.cells] or [0]
    return [CellNeed(cell, size, cell_host_cpus(dom, cell)) for cell, size in zip(ids, sizes, strict=True)]


def fixed_from_nodes(name: str, needs: Sequence[CellNeed], nodes: Sequence[int]) -> dict[int, int]:
    """``--nodes 1`` puts every cell on node 1; ``--nodes 0,1`` gives one node per cell, in cell order."""
    if len(nodes) == 1:
        return {need.cell: nodes[0] for need in needs}
    if len(nodes) != len(needs):
        raise PlacementError(f"--nodes names {len(nodes)} host nodes for {len(needs)} guest cells; "
                             "give one node, or one per cell", name)
    return {need.cell: node for need, node in zip(needs, nodes, strict=True)}


def plan(xml: bytes | str, *, page_size: int, rooms: Sequence[NodeRoom] | None, backend: str = "dmemfs",
         nodes: Sequence[int] | None = None, round_up: bool = False) -> Plan:
    """Everything `rewrite`, `plan` and `enable` need; raises a one-line DmemError on refusal."""
    tree = domxml.parse(xml)
    original = xml.encode() if isinstance(xml, str) else bytes(xml)
    dom = read_domain(tree.getroot())
    name = dom.name
    reason = unsupported(dom, page_size, backend=backend)
    if reason:
        raise DomainXMLError(reason, name)
    needs = needs_of(dom, page_size, round_up=round_up)
    cellless = not dom.cells
    kind = "huge" if backend == "hugetlbfs" else "dmem"
    if nodes:
        fixed = fixed_from_nodes(name, needs, nodes)
    elif dom.metadata is not None:
        fixed = {placed.cell: placed.node for placed in dom.metadata.cells}
    else:
        fixed = {}
    if rooms is None:
        if len(fixed) != len(needs):
            raise PlacementError("no pool information on this host: give the host nodes with --nodes", name)
        placement = fixed
    else:
        try:
            placement = place(name, needs, rooms, page_size, fixed=fixed, cellless=cellless, kind=kind)
        except PlacementError:
            if nodes or not fixed:
                raise
            # The recorded placement no longer fits: choose afresh rather than keep a refusal.
            placement = place(name, needs, rooms, page_size, cellless=cellless, kind=kind)
    warnings = domxml.rewrite(tree, placement, page_size, backend=backend, round_up=round_up)
    return Plan(name=name, page_size=page_size, needs=tuple(needs), rooms=tuple(rooms or ()),
                placement=dict(placement), original=original, rewritten=domxml.serialize(tree),
                warnings=tuple(warnings), encoding=tree.docinfo.encoding or "UTF-8", kind=kind)


def undo(xml: bytes | str) -> tuple[str, bytes | None]:
    """(domain name, restored XML) or (name, None) when the domain is not ours."""
    tree = domxml.parse(xml)
    name = read_domain(tree.getroot()).name
    if not domxml.undo(tree):
        return name, None
    return name, domxml.serialize(tree)
