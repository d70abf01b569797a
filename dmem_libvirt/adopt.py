"""Adoption: file-backed guests without our metadata, such as the ones OpenStack Nova defines.

Nova writes file-backed memory into every guest (so its RAM files land on the backend's mount) but cannot
rewrite the XML and redefines the domain on every hard reboot.  With ``[adopt] file_backed = "admit"`` such a
guest is given, in memory only, the metadata our define-time rewrite would have written: each guest cell
(or all the RAM of a guest without cells) on the host node its ``<numatune>`` names, else on the node that
admission chooses, which pinning makes true (QEMU maps the pages where they already are).  From there it
goes through the lifecycle like any guest of ours; its reservations are keyed by the domain UUID.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import log, procmaps, runtime
from .domain import (
    CellPlacement,
    DmemMetadata,
    DomainMemory,
    Element,
    aligned_sizes,
    hole_punch_warnings,
    parse_cpuset,
)
from .errors import DmemError, DomainXMLError
from .units import format_page_size

if TYPE_CHECKING:
    from .lifecycle import HookContext


@dataclass(frozen=True)
class NumaTune:
    """The host nodes a guest's ``<numatune>`` allows: per guest cell (memnode), and for all of its RAM."""

    memory: frozenset[int] = frozenset()             # <memory nodeset>; empty when absent
    memnodes: Mapping[int, frozenset[int]] | None = None   # cellid -> <memnode nodeset>

    def allowed(self, cell: int) -> frozenset[int]:
        """Host nodes guest cell ``cell`` may use; empty means any."""
        return (self.memnodes or {}).get(cell, self.memory)


def read_numatune(root: Element) -> NumaTune:
    """``<numatune>`` of a <domain> element; nodesets use libvirt's CPU-list syntax (domain.parse_cpuset)."""
    tune = root.find("numatune")
    if tune is None:
        return NumaTune()
    memory = tune.find("memory")
    nodes: frozenset[int] = frozenset()
    # placement='auto' (numad) names no nodes: the host chooses, as without <numatune>.
    if memory is not None and memory.get("nodeset"):
        nodes = parse_cpuset(memory.get("nodeset"), "<numatune><memory nodeset>")
    memnodes: dict[int, frozenset[int]] = {}
    for memnode in tune.findall("memnode"):
        cell = memnode.get("cellid") or ""
        if not cell.isdigit():
            raise DomainXMLError(f"<numatune><memnode cellid> {cell!r} is not a guest cell number")
        memnodes[int(cell)] = parse_cpuset(memnode.get("nodeset"), f"<memnode cellid='{cell}' nodeset>")
    return NumaTune(nodes, memnodes)


def wanted(ctx: HookContext, dom: DomainMemory) -> bool:
    """True when the configuration admits this guest and its RAM would land on our backend: a file-backed
    guest whose memory_backing_dir is on the backend's mount, or a <hugepages> guest under hugetlbfs."""
    from .lifecycle import backing_dir_on_backend

    if dom.metadata is not None:
        return False
    if dom.file_backed:
        return ctx.config.adopt.file_backed == "admit" and backing_dir_on_backend(ctx)
    return dom.hugepages and ctx.config.adopt.hugepages == "admit" and ctx.backend.name == "hugetlbfs"


def for_operation(ctx: HookContext, root: Element, dom: DomainMemory, operation: str) -> DomainMemory:
    """What a hook operation sees of the guest: adopted when wanted, else ``dom`` unchanged."""
    if not wanted(ctx, dom):
        return dom
    pid = None
    if operation == "reconnect":
        try:
            pid = runtime.read_pid(ctx.run_dir, dom.name)
        except DmemError:
            pid = None
    return adopt(ctx, root, dom, operation=operation, pid=pid)


def for_running(ctx: HookContext, root: Element, dom: DomainMemory, pid: int | None) -> DomainMemory:
    """A running guest as a ledger rebuild sees it: adopted, nodes from ``<numatune>`` or QEMU's pages."""
    if not wanted(ctx, dom):
        return dom
    return adopt(ctx, root, dom, operation="rebuild", pid=pid)


def adopt(ctx: HookContext, root: Element, dom: DomainMemory, *, operation: str,
          pid: int | None = None) -> DomainMemory:
    """``dom`` with the metadata of an admitted guest; raises the refusal line when it cannot be backed.

    Cells without a node in ``<numatune>`` take it from the ledger (after ``prepare``) or from where
    QEMU's pages are (``pid``, for a running guest whose reservation was lost); at ``prepare`` they are
    left to admission.
    """
    name = dom.name
    page_size = _page_size(ctx, dom)
    reason = ctx.backend.unsupported(dom, page_size)
    if reason:
        raise DomainXMLError(reason, name)
    _check_page_multiples(dom, page_size)
    tune = read_numatune(root)
    # At prepare a stale entry must not pin the guest to its old node; a rebuild has no ledger to read.
    known = _ledger_nodes(ctx, dom) if operation in ("start", "started", "reconnect") else {}
    cells = []
    free_allowed: set[int] = set()
    any_node = False
    sizes = [(cell.id, cell.size, f"ram-node{cell.id}") for cell in dom.cells] or [(0, dom.memory, "pc.ram")]
    for cell, size, file in sizes:
        allowed = tune.allowed(cell)
        node = next(iter(allowed)) if len(allowed) == 1 else known.get(file)
        if node is None and pid is not None:
            node = _resident_node(ctx, name, root.get("id"), pid, file)
        if node is None:
            free_allowed |= allowed
            any_node = any_node or not allowed
        cells.append(CellPlacement(cell, node, size, file))
    metadata = DmemMetadata(ctx.backend.name, page_size, tuple(cells), cellless=not dom.cells,
                            allowed=frozenset() if any_node else frozenset(free_allowed))
    if operation == "prepare":
        for warning in hole_punch_warnings(dom, backend=ctx.backend.name):
            log.warning(f"{warning}; admitted anyway", name)
    return replace(dom, metadata=metadata)


def _page_size(ctx: HookContext, dom: DomainMemory) -> int:
    """The backend's page size; a <hugepages> guest's own (Nova's hw:mem_page_size), which the host must have."""
    if not dom.hugepages:
        return ctx.backend.page_size()
    size = dom.hugepage_size or ctx.backend.page_size()
    sizes = ctx.backend.page_sizes()
    if size not in sizes:
        have = " or ".join(format_page_size(s) for s in sizes) or "no"
        raise DomainXMLError(f"asks for {format_page_size(size)} huge pages; libvirt's hugetlbfs mounts on this "
                             f"host have {have} pages", dom.name)
    return size


def _check_page_multiples(dom: DomainMemory, page_size: int) -> None:
    named = [f"guest cell {cell.id}" for cell in dom.cells] or ["<memory>"]
    actual = [cell.size for cell in dom.cells] or [dom.memory]
    for what, size, whole in zip(named, actual, aligned_sizes(dom, page_size, round_up=True), strict=True):
        if size != whole:
            # The backing file must be a whole number of pages and exactly as large as QEMU's backend.
            choices = format_page_size(whole)
            if whole > page_size:
                choices = f"{format_page_size(whole - page_size)} or {choices}"
            raise DomainXMLError(f"{what} is {format_page_size(size)}, not a multiple of "
                                 f"{format_page_size(page_size)} pages; give the guest (its flavor) {choices}",
                                 dom.name)


def _ledger_nodes(ctx: HookContext, dom: DomainMemory) -> dict[str, int]:
    """Backing file -> host node, as this guest's reservations record it (lock-free read)."""
    try:
        return {entry.file: entry.node for entry in ctx.ledger.read() if entry.uuid == dom.uuid}
    except DmemError:
        # A corrupt ledger is rebuilt by the operation's own transaction.
        return {}


def _resident_node(ctx: HookContext, name: str, dom_id: str | None, pid: int, file: str) -> int | None:
    """The host node holding most of the pages QEMU ``pid`` maps for the guest's memory backend ``file``."""
    paths = {os.path.realpath(directory / file)
             for directory in runtime.domain_dir_candidates(ctx.host.memory_backing_dir(), name, dom_id)}
    # On hugetlbfs QEMU maps a file it made and unlinked: qemu_back_mem.<memory backend id>.XXXXXX.
    marker = f"/qemu_back_mem.{file}."
    for mapping in procmaps.numa_mappings(ctx.proc, pid):
        if (mapping.file in paths or marker in mapping.file) and mapping.pages:
            return max(sorted(mapping.pages), key=lambda node: mapping.pages[node])
    return None
