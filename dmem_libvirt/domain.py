"""Read-only model of what a libvirt domain XML says about guest RAM, and whether dmem can back it.

`read_domain` takes the <domain> element of either xml.etree.ElementTree or lxml and uses only the API
both share, so the hook can parse with the stdlib and never import lxml.  Sizes are ints of bytes.
Malformed values raise errors.DomainXMLError naming the element and the offending text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import XMLNS
from .errors import DomainXMLError
from .units import GiB, format_page_size, libvirt_bytes

NS = XMLNS
PREFIX = "dmem"
METADATA_VERSION = "1"

# An element of xml.etree.ElementTree or lxml.etree: only find/findall/get/text/tag/iter are used.
Element = Any

_X86_ARCHES = frozenset({"x86_64", "i686"})
# libvirt <devices><memory model=...>: each is its own QEMU backend, which we do not place or pin yet.
_MEMORY_DEVICE_MODELS = ("dimm", "nvdimm", "virtio-mem", "virtio-pmem", "sgx-epc")


@dataclass(frozen=True)
class GuestCell:
    id: int
    size: int                    # bytes (libvirt <cell memory= unit=>, default KiB)
    vcpus: frozenset[int]        # from <cell cpus="0-3">
    discard: bool = False        # <cell discard='yes'>


@dataclass(frozen=True)
class CellPlacement:
    cell: int
    node: int
    size: int
    file: str                    # the backend file QEMU maps: "ram-node<id>", or "pc.ram" without cells


@dataclass(frozen=True)
class DmemMetadata:
    backend: str                 # "dmemfs", "hugetlbfs", "dax"
    page_size: int
    cells: tuple[CellPlacement, ...]
    cellless: bool               # the guest had no <cpu><numa> cells


@dataclass(frozen=True)
class DomainMemory:
    name: str
    uuid: str | None
    memory: int                              # <memory> in bytes, 0 when absent
    cells: tuple[GuestCell, ...]             # empty for a guest without NUMA cells
    vcpu_pins: dict[int, frozenset[int]]     # <cputune><vcpupin vcpu cpuset>
    vcpu_cpuset: frozenset[int] | None       # <vcpu cpuset=...>
    source_type: str | None                  # memoryBacking/source@type
    access_mode: str | None                  # memoryBacking/access@mode
    allocation_mode: str | None              # memoryBacking/allocation@mode
    hugepages: bool
    locked: bool
    discard: bool
    nosharepages: bool
    memory_devices: tuple[str, ...]          # <devices><memory model=...>
    free_page_reporting: bool                # <memballoon freePageReporting='on'>
    arch: str | None                         # <os><type arch=...>
    metadata: DmemMetadata | None
    vcpu_count: int = 0                      # <vcpu>N</vcpu>
    hugepage_size: int | None = None         # <hugepages><page size= unit=> of the first <page>, in bytes

    @property
    def file_backed(self) -> bool:
        """True when libvirt gives guest RAM a memory-backend-file (a file under memory_backing_dir).

        libvirt 9.0 picks memory-backend-file for source type 'file', and also when an access mode is
        set without a source (or with source 'file'); memfd and anonymous sources are never files.
        """
        if self.source_type == "file":
            return True
        return self.access_mode is not None and self.source_type is None


def read_domain(root: Element) -> DomainMemory:
    """The memory-relevant view of a <domain> element (stdlib ElementTree or lxml)."""
    if root is None or root.tag != "domain":
        tag = getattr(root, "tag", None)
        raise DomainXMLError(f"domain XML root element is <{tag}>, not <domain>")
    name = _text(root.find("name"))
    if not name:
        raise DomainXMLError("domain XML has no <name>")
    try:
        return _read(root, name)
    except DomainXMLError as err:
        raise err.for_domain(name) from None


def _read(root: Element, name: str) -> DomainMemory:
    memory_el = root.find("memory")
    memory = _scaled(memory_el, "<memory>") if memory_el is not None else 0
    backing = root.find("memoryBacking")
    source = _child_attr(backing, "source", "type")
    access = _child_attr(backing, "access", "mode")
    allocation = _child_attr(backing, "allocation", "mode")
    vcpu_el = root.find("vcpu")
    vcpu_count = 0
    vcpu_cpuset = None
    if vcpu_el is not None:
        count_text = _text(vcpu_el)
        if count_text:
            vcpu_count = _uint(count_text, "<vcpu>")
        if vcpu_el.get("cpuset"):
            vcpu_cpuset = parse_cpuset(vcpu_el.get("cpuset"), "<vcpu cpuset>")
    pins: dict[int, frozenset[int]] = {}
    for pin in root.findall("cputune/vcpupin"):
        vcpu = _uint(pin.get("vcpu"), "<vcpupin vcpu>")
        pins[vcpu] = parse_cpuset(pin.get("cpuset"), f"<vcpupin vcpu='{vcpu}' cpuset>")
    devices = tuple(dev.get("model") or "?" for dev in root.findall("devices/memory"))
    balloons = root.findall("devices/memballoon")
    reporting = any((balloon.get("freePageReporting") or "").lower() == "on" for balloon in balloons)
    os_type = root.find("os/type")
    return DomainMemory(
        name=name,
        uuid=_text(root.find("uuid")) or None,
        memory=memory,
        cells=_cells(root),
        vcpu_pins=pins,
        vcpu_cpuset=vcpu_cpuset,
        source_type=source,
        access_mode=access,
        allocation_mode=allocation,
        hugepages=backing is not None and backing.find("hugepages") is not None,
        locked=backing is not None and backing.find("locked") is not None,
        discard=backing is not None and backing.find("discard") is not None,
        nosharepages=backing is not None and backing.find("nosharepages") is not None,
        memory_devices=devices,
        free_page_reporting=reporting,
        arch=os_type.get("arch") if os_type is not None else None,
        metadata=_metadata(root),
        vcpu_count=vcpu_count,
        hugepage_size=_hugepage_size(backing),
    )


def _hugepage_size(backing: Element | None) -> int | None:
    page = backing.find("hugepages/page") if backing is not None else None
    if page is None or page.get("size") is None:
        return None
    try:
        return libvirt_bytes(page.get("size"), page.get("unit"))
    except ValueError as err:
        raise DomainXMLError(f"<hugepages><page size>: {err}") from None


def _cells(root: Element) -> tuple[GuestCell, ...]:
    cells = []
    for index, cell in enumerate(root.findall("cpu/numa/cell")):
        # libvirt numbers cells in document order when id= is left out.
        cell_id = _uint(cell.get("id"), "<cell id>") if cell.get("id") is not None else index
        where = f"guest cell {cell_id}"
        if cell.get("memory") is None:
            raise DomainXMLError(f"{where} has no memory= size")
        try:
            size = libvirt_bytes(cell.get("memory"), cell.get("unit"))
        except ValueError as err:
            raise DomainXMLError(f"{where}: {err}") from None
        cpus = parse_cpuset(cell.get("cpus"), f"{where} cpus") if cell.get("cpus") else frozenset()
        discard = (cell.get("discard") or "").lower() == "yes"
        cells.append(GuestCell(cell_id, size, cpus, discard))
    return tuple(cells)


def _metadata(root: Element) -> DmemMetadata | None:
    mine = root.find(f"metadata/{{{NS}}}memory")
    if mine is None:
        return None
    version = mine.get("version")
    if version != METADATA_VERSION:
        raise DomainXMLError(f"dmem metadata version {version!r} is not understood "
                             f"(expected {METADATA_VERSION})")
    backend = mine.get("backend") or ""
    if not backend:
        raise DomainXMLError("dmem metadata has no backend=")
    page_size = _uint(mine.get("page-size"), "dmem metadata page-size")
    placed = []
    for cell in mine.findall(f"{{{NS}}}cell"):
        placed.append(CellPlacement(
            cell=_uint(cell.get("id"), "dmem metadata cell id"),
            node=_uint(cell.get("node"), "dmem metadata cell node"),
            size=_uint(cell.get("bytes"), "dmem metadata cell bytes"),
            file=cell.get("file") or "",
        ))
        if not placed[-1].file or "/" in placed[-1].file:
            raise DomainXMLError(f"dmem metadata cell {placed[-1].cell} has a bad file= {cell.get('file')!r}")
    return DmemMetadata(backend, page_size, tuple(placed), (mine.get("cellless") or "") == "yes")


def backing_files(dom: DomainMemory) -> list[CellPlacement]:
    """The backing files QEMU will map, with node and size, as the metadata records them."""
    if dom.metadata is None:
        raise DomainXMLError("has no dmem-libvirt metadata: its RAM was never placed on dmem", dom.name)
    if not dom.metadata.cells:
        raise DomainXMLError("dmem metadata lists no cells", dom.name)
    return list(dom.metadata.cells)


def cell_host_cpus(dom: DomainMemory, cell_id: int) -> frozenset[int]:
    """Host CPUs the cell's vCPUs are pinned to (vcpupin, else <vcpu cpuset>); empty if unpinned.

    For a guest without cells, cell 0 stands for all its vCPUs.
    """
    if dom.cells:
        vcpus: frozenset[int] = frozenset()
        for cell in dom.cells:
            if cell.id == cell_id:
                vcpus = cell.vcpus
    else:
        vcpus = frozenset(range(dom.vcpu_count)) | frozenset(dom.vcpu_pins)
    host: set[int] = set()
    for vcpu in vcpus:
        pinned = dom.vcpu_pins.get(vcpu, dom.vcpu_cpuset)
        if pinned:
            host |= pinned
    return frozenset(host)


def unsupported(dom: DomainMemory, page_size: int, *, backend: str = "dmemfs") -> str | None:
    """The one-line reason this guest's RAM cannot be put on the backend, or None."""
    if dom.memory <= 0:
        return "domain XML has no <memory> size (or it is 0)"
    if dom.arch is not None and dom.arch not in _X86_ARCHES:
        return f"<os><type arch='{dom.arch}'> is not supported: dmem guests must be x86_64 or i686"
    if page_size < 4096 or page_size & (page_size - 1):
        return f"page size {page_size} bytes is not a power of two of at least 4 KiB"
    if backend == "dmemfs" and page_size >= GiB:
        # QEMU reads a backing file's page size only on hugetlbfs; 1 GiB dmem pages would need
        # memory-backend-file align=1G, which libvirt has no XML for on guest RAM.
        return (f"{format_page_size(page_size)} dmemfs pages need QEMU align={format_page_size(page_size)}, "
                "which libvirt cannot express for guest RAM; mount dmemfs with pagesize=2M or 4K")
    if backend == "hugetlbfs":
        return _unsupported_on_hugetlbfs(dom)
    if dom.hugepages:
        return ("<memoryBacking><hugepages/> already puts guest RAM on hugetlbfs; "
                "remove it to place the guest on dmem")
    if dom.source_type in ("memfd", "anonymous"):
        return (f"<memoryBacking><source type='{dom.source_type}'/> is not file-backed; "
                "remove it to place the guest on dmem")
    if dom.locked:
        # dmem pages are allocated and pinned at start and never swapped: <locked/> adds nothing but
        # an mlock of the whole guest that the memlock limit would have to cover.
        return ("<memoryBacking><locked/> is not needed on dmem (its pages are never swapped and are "
                "pinned at start); remove it")
    for model in dom.memory_devices:
        if model in _MEMORY_DEVICE_MODELS or model == "?":
            return (f"<devices><memory model='{model}'> is not backed by dmem yet; "
                    "remove the memory device")
    return None


def _unsupported_on_hugetlbfs(dom: DomainMemory) -> str | None:
    # libvirt itself gives hugepages guests memory-backend-file on its hugetlbfs mount; memfd would
    # put guest RAM on hugetlb memory without a mount, which started cannot tell from anything else.
    if dom.source_type == "memfd":
        return ("<memoryBacking><source type='memfd'/> is not placed on the hugetlbfs pools; "
                "remove it (libvirt then maps its hugetlbfs mount)")
    if dom.allocation_mode == "ondemand":
        return "<memoryBacking><allocation mode='ondemand'/> cannot be combined with hugepages; remove it"
    for model in dom.memory_devices:
        if model in _MEMORY_DEVICE_MODELS or model == "?":
            return (f"<devices><memory model='{model}'> is not placed on the hugetlbfs pools yet; "
                    "remove the memory device")
    return None


def hole_punch_warnings(dom: DomainMemory, *, backend: str = "dmemfs") -> list[str]:
    """Features that rely on punching holes in guest RAM, which frees nothing on dmemfs or device-dax."""
    if backend == "hugetlbfs":
        return []
    why = f"frees nothing on {backend} (no hole punching)"
    warnings = []
    if dom.discard:
        warnings.append(f"<memoryBacking><discard/> {why}")
    warnings.extend(f"guest cell {cell.id} discard='yes' {why}" for cell in dom.cells if cell.discard)
    if dom.free_page_reporting:
        warnings.append(f"memballoon freePageReporting {why}")
    return warnings


def aligned_sizes(dom: DomainMemory, page_size: int, *, round_up: bool) -> tuple[int, ...]:
    """Per guest cell (one entry for a guest without cells) the size as a multiple of page_size.

    Without round_up a size that is not a multiple is refused with the nearest valid sizes.
    """
    named = [(f"guest cell {cell.id}", cell.size) for cell in dom.cells] if dom.cells else [("<memory>", dom.memory)]
    sizes = []
    for what, size in named:
        below = size - size % page_size
        if below == size:
            sizes.append(size)
            continue
        above = below + page_size
        if round_up:
            sizes.append(above)
            continue
        # Exact figures (format_page_size never rounds) so the user can paste them into the XML.
        choices = format_page_size(above)
        if below:
            choices = f"{format_page_size(below)} or {choices}"
        raise DomainXMLError(
            f"{what} is {format_page_size(size)}, not a multiple of {format_page_size(page_size)} pages; "
            f"use {choices}, or --round to round up", dom.name)
    return tuple(sizes)


def parse_cpuset(text: str | None, what: str) -> frozenset[int]:
    """libvirt's cpuset syntax "0-3,^2,8" as a set; raises DomainXMLError quoting the text."""
    chosen: set[int] = set()
    excluded: set[int] = set()
    try:
        for raw in (text or "").split(","):
            part = raw.strip()
            target = chosen
            if part.startswith("^"):
                target, part = excluded, part[1:].strip()
            first, sep, last = part.partition("-")
            start = int(first) if _digits(first) else -1
            end = int(last) if sep and _digits(last) else (start if not sep else -1)
            if start < 0 or end < start:
                raise ValueError(part)
            target.update(range(start, end + 1))
    except ValueError:
        raise DomainXMLError(f"{what} {text!r} is not a CPU list like '0-3,^2,8'") from None
    return frozenset(chosen - excluded)


def _digits(text: str) -> bool:
    return text.strip().isascii() and text.strip().isdigit()


def _text(element: Element | None) -> str:
    if element is None or element.text is None:
        return ""
    return str(element.text).strip()


def _child_attr(parent: Element | None, child: str, attribute: str) -> str | None:
    if parent is None:
        return None
    element = parent.find(child)
    if element is None:
        return None
    value = element.get(attribute)
    return str(value) if value is not None else None


def _uint(text: str | None, what: str) -> int:
    value = (text or "").strip()
    if not (value.isascii() and value.isdigit()):
        raise DomainXMLError(f"{what} {text!r} is not a whole number")
    return int(value)


def _scaled(element: Element, what: str) -> int:
    try:
        return libvirt_bytes(element.text or "", element.get("unit"))
    except ValueError as err:
        raise DomainXMLError(f"{what}: {err}") from None
