"""Define-time domain XML: hardened parsing, the dmem rewrite, its undo, and retargeting to other nodes.

All edits happen in place on the lxml tree: new nodes copy their neighbour's indentation and nothing the
rewrite does not own is regenerated, so the rest stays byte-identical (always equal under C14N 2.0).
What the rewrite replaced is kept in the domain's own <metadata>, so `undo` restores the original and a
second `rewrite` first undoes the first: rewriting is idempotent.  Every refusal is one DomainXMLError line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence

from lxml import etree

from .domain import (
    METADATA_VERSION,
    NS,
    PREFIX,
    DomainMemory,
    aligned_sizes,
    hole_punch_warnings,
    parse_cpuset,
    read_domain,
    unsupported,
)
from .errors import DomainXMLError
from .units import LIBVIRT_UNITS, KiB, MiB, format_size

MAX_XML_BYTES = 10 * 1024 * 1024

_MEMORY = f"{{{NS}}}memory"
_CELL = f"{{{NS}}}cell"
_ORIGINAL = f"{{{NS}}}original"
# Children of <memoryBacking> in the order libvirt formats them (domain_conf.c).
_BACKING_ORDER = ("hugepages", "nosharepages", "locked", "source", "access", "allocation", "discard")
# Where libvirt formats <memoryBacking>, <numatune> and <metadata>: after the last of these present.
_BACKING_AFTER = ("maxMemory", "memory", "currentMemory", "blkiotune", "memtune")
_NUMATUNE_AFTER = (*_BACKING_AFTER, "memoryBacking", "vcpu", "vcpus", "iothreads", "iothreadids",
                   "defaultiothread", "cputune")
_METADATA_AFTER = ("name", "uuid", "genid", "title", "description")
# Elements restored wholesale by undo, in the order they are recorded.
_WHOLE = ("memory", "currentMemory", "memoryBacking", "numatune")
_DECLARATION = re.compile(rb"""^\s*<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def _parser() -> etree.XMLParser:
    # No entity expansion, no DTD, no network, libxml2's default depth and size limits.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                           remove_blank_text=False, dtd_validation=False)


def _to_bytes(data: bytes | str, what: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    head = data[:200].encode("utf-8", "replace")
    declared = _DECLARATION.match(head)
    encoding = declared.group(1).decode() if declared else "utf-8"
    try:
        return data.encode(encoding)
    except (LookupError, UnicodeEncodeError) as err:
        raise DomainXMLError(f"{what} cannot be encoded as its declared {encoding}: {err}") from None


def _parse_bytes(raw: bytes, what: str) -> etree._ElementTree:
    if not raw.strip():
        raise DomainXMLError(f"{what} is empty")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        # libvirt never writes a DOCTYPE; one here can only smuggle entities (expansion bombs, local
        # files).  Refused before libxml2 sees it; the check after parsing covers other encodings.
        raise DomainXMLError(f"{what} has a DOCTYPE or entity declarations; refusing it")
    if len(raw) > MAX_XML_BYTES:
        raise DomainXMLError(f"{what} is {format_size(len(raw))}; "
                             f"refusing more than {format_size(MAX_XML_BYTES)}")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as err:
        detail = (err.msg or str(err)).splitlines()[0] if (err.msg or str(err)) else "unknown error"
        raise DomainXMLError(f"{what} is not well-formed XML: {detail}") from None
    except ValueError as err:
        raise DomainXMLError(f"{what} cannot be parsed: {err}") from None
    tree = root.getroottree()
    docinfo = tree.docinfo
    if getattr(docinfo, "doctype", "") or docinfo.internalDTD is not None or docinfo.system_url:
        raise DomainXMLError(f"{what} has a DOCTYPE or entity declarations; refusing it", _name_of(root))
    return tree


def _name_of(root: etree._Element) -> str | None:
    if root.tag != "domain":
        return None
    name = root.findtext("name")
    return name.strip() if name and name.strip() else None


def parse(data: bytes | str, *, what: str = "domain XML") -> etree._ElementTree:
    """Parse untrusted domain XML: no entities, no DTD, bounded size, <domain> with <name> and <memory>."""
    tree = _parse_bytes(_to_bytes(data, what), what)
    root = tree.getroot()
    if not isinstance(root.tag, str) or root.tag != "domain":
        raise DomainXMLError(f"{what} has root element <{root.tag}>, not <domain>")
    name = _name_of(root)
    if name is None:
        raise DomainXMLError(f"{what} has no <name>")
    if root.find("memory") is None:
        raise DomainXMLError(f"{what} has no <memory> element", name)
    return tree


def serialize(tree: etree._ElementTree) -> bytes:
    """The document as bytes, with its XML declaration (if it had one), encoding and comments.

    Comments and processing instructions around <domain> go on lines of their own, as written.
    """
    docinfo = tree.docinfo
    encoding = docinfo.encoding or "UTF-8"
    newline = "\n".encode(encoding)
    if len(newline) != 1:
        # Not ASCII-compatible (UTF-16/32): let libxml2 lay the whole document out.
        data = etree.tostring(tree, encoding=encoding, xml_declaration=docinfo.standalone is not None)
        assert isinstance(data, bytes)
        return data
    root = tree.getroot()
    parts: list[bytes] = []
    # lxml reports standalone=None exactly when the document had no XML declaration.
    if docinfo.standalone is not None:
        standalone = ' standalone="yes"' if docinfo.standalone else ""
        parts.append(f'<?xml version="{docinfo.xml_version or "1.0"}" encoding="{encoding}"{standalone}?>'
                     .encode(encoding))
    nodes = [*reversed(list(root.itersiblings(preceding=True))), root, *root.itersiblings()]
    for node in nodes:
        data = etree.tostring(node, encoding=encoding, xml_declaration=False, with_tail=False)
        assert isinstance(data, bytes)
        parts.append(data)
    return newline.join(parts) + newline


def canonical(tree_or_bytes: etree._ElementTree | etree._Element | bytes | str) -> bytes:
    """C14N 2.0 (with comments) of a tree or of XML text, for equality checks."""
    if isinstance(tree_or_bytes, bytes | str):
        target: etree._ElementTree | etree._Element = _parse_bytes(_to_bytes(tree_or_bytes, "XML"), "XML")
    else:
        target = tree_or_bytes
    text: str = etree.canonicalize(target, with_comments=True)
    return text.encode("utf-8")


def is_ours(tree: etree._ElementTree) -> bool:
    """True when the domain carries dmem-libvirt metadata."""
    return _record(tree.getroot()) is not None


def _record(root: etree._Element) -> etree._Element | None:
    return root.find(f"metadata/{_MEMORY}")


# -- rewrite ---------------------------------------------------------------------------------------------


def rewrite(tree: etree._ElementTree, placement: Mapping[int, int], page_size: int, *,
            backend: str = "dmemfs", round_up: bool = False) -> list[str]:
    """Put the domain's RAM on `backend` pages of `page_size`, guest cell -> host node per `placement`.

    Edits the tree in place and returns warnings; refuses (tree untouched) with a DomainXMLError.
    A cell-less guest is placed with key 0.  Rewriting a rewritten domain starts from its original.
    """
    root = tree.getroot()
    view = root
    if _record(root) is not None:
        view = copy.deepcopy(root)
        _undo_root(view)
    dom = read_domain(view)
    reason = unsupported(dom, page_size, backend=backend)
    if reason:
        raise DomainXMLError(reason, dom.name)
    sizes = aligned_sizes(dom, page_size, round_up=round_up)
    cell_ids = [cell.id for cell in dom.cells] or [0]
    _check_placement(dom, cell_ids, placement)
    _check_numatune(view, dom, placement)
    warnings = hole_punch_warnings(dom, backend=backend)
    if view is not root:
        _undo_root(root)
    record = _Record()
    _resize(root, dom, sizes, record)
    if backend == "hugetlbfs":
        _back_with_hugepages(root, dom, page_size, record)
    else:
        _back_with_files(root, record)
    _bind_cells(root, dom, placement, record)
    _write_metadata(root, dom, dict(zip(cell_ids, sizes, strict=True)), placement, page_size, backend, record)
    return warnings


def _check_placement(dom: DomainMemory, cell_ids: Sequence[int], placement: Mapping[int, int]) -> None:
    wanted, given = set(cell_ids), set(placement)
    if wanted != given:
        what = "guest cells" if dom.cells else "a guest without cells (key 0)"
        raise DomainXMLError(f"placement names cells {_ids(given)} but the domain has {what} {_ids(wanted)}",
                             dom.name)
    for cell, node in placement.items():
        if isinstance(node, bool) or not isinstance(node, int) or node < 0:
            raise DomainXMLError(f"placement of guest cell {cell} on host node {node!r} is not a node number",
                                 dom.name)


def _check_numatune(root: etree._Element, dom: DomainMemory, placement: Mapping[int, int]) -> None:
    """A user's <numatune><memory> is kept beside per-cell memnodes only when it cannot contradict them."""
    memory = root.find("numatune/memory")
    if memory is None or not dom.cells:
        return
    if memory.get("placement") == "auto":
        raise DomainXMLError("<numatune><memory placement='auto'> cannot be combined with per-cell binding; "
                             "remove placement='auto'", dom.name)
    mode = memory.get("mode") or "strict"
    nodeset = memory.get("nodeset")
    if mode not in ("strict", "restrictive") or not nodeset:
        return
    # libvirt confines the whole QEMU process to this nodeset (cgroup cpuset.mems); a cell bound to a
    # node outside it could not allocate there.
    allowed = parse_cpuset(nodeset, "<numatune><memory nodeset>")
    for cell, node in sorted(placement.items()):
        if node not in allowed:
            raise DomainXMLError(
                f"<numatune><memory mode='{mode}' nodeset='{nodeset}'> would keep QEMU off host node {node} "
                f"chosen for guest cell {cell}; widen or remove it, or choose nodes within it", dom.name)


def _ids(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(ids)) or "none"


class _Record:
    """What the rewrite replaced, written into the metadata for undo."""

    def __init__(self) -> None:
        self.whole: dict[str, str | None] = {}          # element -> serialized original, None = absent
        self.cells: list[tuple[str, dict[str, str]]] = []  # (cell id, original memory/unit attributes)
        self.metadata: str | None = ""                   # "" = had children, None = absent, else its XML

    def keep(self, name: str, element: etree._Element | None) -> None:
        if name not in self.whole:
            self.whole[name] = None if element is None else _fragment(element)


def _fragment(element: etree._Element) -> str:
    # A detached copy serializes without the namespace declarations it inherits from <domain>.
    return etree.tostring(copy.deepcopy(element), with_tail=False, encoding="unicode")


def _resize(root: etree._Element, dom: DomainMemory, sizes: Sequence[int], record: _Record) -> None:
    """Round guest cells (or <memory> of a cell-less guest) to whole pages; totals follow."""
    if dom.cells:
        for element, cell, size in zip(_cell_elements(root), dom.cells, sizes, strict=True):
            if size != cell.size:
                attrs = {key: value for key in ("memory", "unit") if (value := element.get(key)) is not None}
                record.cells.append((str(cell.id), attrs))
                text, unit = _scaled(size, element.get("unit"))
                element.set("memory", text)
                if unit is not None and unit != element.get("unit"):
                    element.set("unit", unit)
    rounded = [cell.size for cell in dom.cells] != list(sizes) if dom.cells else sizes[0] != dom.memory
    total = sum(sizes)
    # Cells that do not add up to <memory> are libvirt's to judge; only our rounding moves the total.
    if not rounded or total == dom.memory:
        return
    memory = root.find("memory")
    current = root.find("currentMemory")
    assert memory is not None  # parse() and unsupported() refuse a domain without it
    record.keep("memory", memory)
    _set_scaled(memory, total)
    if current is not None:
        current_size = _element_bytes(current)
        # A balloon target below the old size stays; one at (or above) it follows the new total.
        if current_size >= dom.memory or current_size > total:
            record.keep("currentMemory", current)
            _set_scaled(current, total)


def _cell_elements(root: etree._Element) -> list[etree._Element]:
    return list(root.iterfind("cpu/numa/cell"))


def _element_bytes(element: etree._Element) -> int:
    factor = LIBVIRT_UNITS.get((element.get("unit") or "KiB").lower(), KiB)
    return int((element.text or "0").strip() or 0) * factor


def _scaled(size: int, unit: str | None) -> tuple[str, str | None]:
    """`size` in the user's unit when exact, else in MiB or KiB (page multiples always are)."""
    factor = LIBVIRT_UNITS.get((unit or "KiB").lower())
    if factor and size % factor == 0:
        return str(size // factor), unit
    if size % MiB == 0:
        return str(size // MiB), "MiB"
    return str(size // KiB), "KiB"


def _set_scaled(element: etree._Element, size: int) -> None:
    text, unit = _scaled(size, element.get("unit"))
    element.text = text
    if unit != element.get("unit") and unit is not None:
        element.set("unit", unit)


def _back_with_files(root: etree._Element, record: _Record) -> None:
    """Shared file-backed RAM, allocated at start: dmemfs files are mmap(MAP_SHARED)-only."""
    backing = root.find("memoryBacking")
    record.keep("memoryBacking", backing)
    wanted = (("source", "type", "file"), ("access", "mode", "shared"), ("allocation", "mode", "immediate"))
    if backing is None:
        backing = etree.Element("memoryBacking")
        _insert_after(root, _last_of(root, _BACKING_AFTER), backing)
    for tag, attribute, value in wanted:
        child = backing.find(tag)
        if child is None:
            child = etree.Element(tag)
            before = _BACKING_ORDER[: _BACKING_ORDER.index(tag)]
            _insert_after(backing, _last_of(backing, before), child)
        child.set(attribute, value)


def _back_with_hugepages(root: etree._Element, dom: DomainMemory, page_size: int, record: _Record) -> None:
    """libvirt's own hugepages XML: one <page> per guest cell (nodeset = the cell), or one for a cell-less guest.

    libvirt then gives QEMU memory-backend-file on its hugetlbfs mount of that size, preallocated; the
    definition starts as it is on a host without the tool.
    """
    backing = root.find("memoryBacking")
    record.keep("memoryBacking", backing)
    if backing is None:
        backing = etree.Element("memoryBacking")
        _insert_after(root, _last_of(root, _BACKING_AFTER), backing)
    hugepages = backing.find("hugepages")
    if hugepages is not None:
        remove_element(hugepages)
    hugepages = etree.Element("hugepages")
    _insert_after(backing, None, hugepages)
    for cell in dom.cells or (None,):
        page = etree.Element("page")
        page.set("size", str(page_size // KiB))
        page.set("unit", "KiB")
        if cell is not None:
            page.set("nodeset", str(cell.id))
        _insert_after(hugepages, _last_element(hugepages), page)


def _bind_cells(root: etree._Element, dom: DomainMemory, placement: Mapping[int, int],
                record: _Record) -> None:
    """numatune strict per guest cell (memnode), or <memory> for a guest without cells."""
    numatune = root.find("numatune")
    record.keep("numatune", numatune)
    if numatune is None:
        numatune = etree.Element("numatune")
        _insert_after(root, _last_of(root, _NUMATUNE_AFTER), numatune)
    if not dom.cells:
        memory = numatune.find("memory")
        if memory is None:
            memory = etree.Element("memory")
            _insert_after(numatune, None, memory)
        if memory.get("placement") is not None:
            del memory.attrib["placement"]
        memory.set("mode", "strict")
        memory.set("nodeset", str(placement[0]))
        return
    for cell in dom.cells:
        memnode = _memnode(numatune, cell.id)
        if memnode is None:
            memnode = etree.Element("memnode")
            anchor = _last_of(numatune, ("memory", "memnode"))
            _insert_after(numatune, anchor, memnode)
            memnode.set("cellid", str(cell.id))
        memnode.set("mode", "strict")
        memnode.set("nodeset", str(placement[cell.id]))


def _memnode(numatune: etree._Element, cell_id: int) -> etree._Element | None:
    for memnode in numatune.iterfind("memnode"):
        if (memnode.get("cellid") or "").strip() == str(cell_id):
            return memnode
    return None


def _write_metadata(root: etree._Element, dom: DomainMemory, sizes: Mapping[int, int],
                    placement: Mapping[int, int], page_size: int, backend: str, record: _Record) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        record.metadata = None
        metadata = etree.Element("metadata")
        _insert_after(root, _last_of(root, _METADATA_AFTER), metadata)
    elif len(metadata) == 0:
        record.metadata = _fragment(metadata)
    mine = etree.Element(_MEMORY, nsmap={PREFIX: NS})
    mine.set("version", METADATA_VERSION)
    mine.set("backend", backend)
    mine.set("page-size", str(page_size))
    if not dom.cells:
        mine.set("cellless", "yes")
    _insert_after(metadata, _last_element(metadata), mine)
    children: list[etree._Element] = []
    for cell_id, size in sizes.items():
        cell = etree.Element(_CELL)
        cell.set("id", str(cell_id))
        cell.set("node", str(placement[cell_id]))
        cell.set("bytes", str(size))
        cell.set("file", f"ram-node{cell_id}" if dom.cells else "pc.ram")
        children.append(cell)
    for name in _WHOLE:
        if name in record.whole:
            children.append(_original(name, record.whole[name]))
    for recorded_id, attrs in record.cells:
        original = _original("cell", None, absent=False)
        original.set("id", recorded_id)
        for key, value in attrs.items():
            original.set(key, value)
        children.append(original)
    if record.metadata != "":
        children.append(_original("metadata", record.metadata))
    for child in children:
        _insert_after(mine, _last_element(mine), child)


def _original(name: str, text: str | None, *, absent: bool = True) -> etree._Element:
    element = etree.Element(_ORIGINAL)
    element.set("element", name)
    if text is not None:
        element.text = text
    elif absent:
        element.set("absent", "yes")
    return element


# -- undo and retarget -----------------------------------------------------------------------------------


def undo(tree: etree._ElementTree) -> bool:
    """Restore what the rewrite replaced and drop its metadata; False if the domain is not ours."""
    return _undo_root(tree.getroot())


def _undo_root(root: etree._Element) -> bool:
    mine = _record(root)
    if mine is None:
        return False
    name = _name_of(root)
    originals = list(mine.iterfind(_ORIGINAL))
    # Parse every record before touching anything: a damaged record leaves the tree as it was.
    restored: list[tuple[str, etree._Element | None]] = []
    cells: list[etree._Element] = []
    metadata_text: str | None = ""
    for original in originals:
        what = original.get("element") or ""
        if what in _WHOLE:
            absent = original.get("absent") == "yes"
            restored.append((what, None if absent else _parse_fragment(original.text or "", what, name)))
        elif what == "cell":
            cells.append(original)
        elif what == "metadata":
            metadata_text = None if original.get("absent") == "yes" else (original.text or "")
            if metadata_text:
                _parse_fragment(metadata_text, "metadata", name)
        else:
            raise DomainXMLError(f"dmem metadata records an unknown original <{what}>", name)
    # Undo in the reverse order of the rewrite so every removal gives back exactly the whitespace taken.
    metadata = mine.getparent()
    assert metadata is not None
    remove_element(mine)
    if len(metadata) == 0:
        if metadata_text is None:
            remove_element(metadata)
        elif metadata_text:
            _replace(metadata, _parse_fragment(metadata_text, "metadata", name))
    for what, element in reversed(restored):
        current = root.find(what)
        if element is None:
            if current is not None:
                remove_element(current)
        elif current is not None:
            _replace(current, element)
        else:
            after = _BACKING_AFTER if what in ("memoryBacking", "currentMemory") else _NUMATUNE_AFTER
            _insert_after(root, _last_of(root, after), element)
    by_id = {(cell.get("id") or str(index)): cell for index, cell in enumerate(_cell_elements(root))}
    for original in cells:
        cell = by_id.get(original.get("id") or "")
        if cell is None:
            continue
        for key in ("memory", "unit"):
            value = original.get(key)
            if value is not None:
                cell.set(key, value)
            elif cell.get(key) is not None:
                del cell.attrib[key]
    return True


def _parse_fragment(text: str, tag: str, name: str | None) -> etree._Element:
    try:
        root = _parse_bytes(text.encode("utf-8"), f"dmem metadata's original <{tag}>").getroot()
    except DomainXMLError as err:
        raise err.for_domain(name or "") from None
    if root.tag != tag:
        raise DomainXMLError(f"dmem metadata's original <{tag}> holds <{root.tag}>", name)
    return root


def retarget(tree: etree._ElementTree, placement: Mapping[int, int]) -> bool:
    """Move the guest's cells to other host nodes (migration, restore); True if anything changed.

    Only numatune nodesets and the metadata's node numbers change.
    """
    root = tree.getroot()
    mine = _record(root)
    if mine is None:
        return False
    name = _name_of(root)
    cells = list(mine.iterfind(_CELL))
    recorded = {int(cell.get("id") or -1) for cell in cells}
    if recorded != set(placement):
        raise DomainXMLError(f"placement names cells {_ids(placement)} "
                             f"but dmem metadata has {_ids(recorded)}", name)
    numatune = root.find("numatune")
    cellless = mine.get("cellless") == "yes"
    targets: list[tuple[etree._Element, str, str]] = []
    for cell in cells:
        cell_id = int(cell.get("id") or -1)
        node = str(placement[cell_id])
        targets.append((cell, "node", node))
        binding = None
        if numatune is not None:
            binding = numatune.find("memory") if cellless else _memnode(numatune, cell_id)
        if binding is None:
            raise DomainXMLError(f"guest cell {cell_id} has no <numatune> binding to retarget; "
                                 "rewrite the domain again", name)
        targets.append((binding, "nodeset", node))
    changed = False
    for element, attribute, value in targets:
        if element.get(attribute) != value:
            element.set(attribute, value)
            changed = True
    return changed


# -- in-place tree editing that keeps the document's indentation ----------------------------------------


def _last_of(parent: etree._Element, tags: Sequence[str]) -> etree._Element | None:
    """The child with one of `tags` that comes last in the document, or None."""
    found = None
    for child in parent:
        if child.tag in tags:
            found = child
    return found


def _last_element(parent: etree._Element) -> etree._Element | None:
    found = None
    for child in parent:
        if isinstance(child.tag, str):
            found = child
    return found


def _indent_before(element: etree._Element) -> str:
    """The whitespace that precedes `element` (its indentation), or "" if it is not pure whitespace."""
    previous = element.getprevious()
    if previous is not None:
        text = previous.tail
    else:
        parent = element.getparent()
        text = parent.text if parent is not None else None
    return text if text and not text.strip() else ""


def _indent_step(element: etree._Element) -> str:
    """One level of indentation, as the document uses it (two spaces in libvirt's own output)."""
    root = element.getroottree().getroot()
    text = root.text or ""
    if text.strip() or "\n" not in text:
        return ""
    return text.rsplit("\n", 1)[1] or "  "


def _insert_after(parent: etree._Element, anchor: etree._Element | None, new: etree._Element) -> None:
    """Insert `new` after `anchor` (first if None), indented like its neighbours; see remove_element."""
    if anchor is None and len(parent) == 0:
        outer = _indent_before(parent) if parent.getparent() is not None else ""
        if not (parent.text or "").strip():
            inner = outer + _indent_step(parent) if "\n" in outer else ""
            parent.text = inner or None
            new.tail = outer or None
        parent.insert(0, new)
        return
    if anchor is None:
        new.tail = parent.text
        parent.insert(0, new)
    else:
        new.tail = anchor.tail
        anchor.tail = _indent_before(anchor) or None
        anchor.addnext(new)


def remove_element(element: etree._Element) -> None:
    """Remove `element`, giving its tail back to what precedes it: the exact inverse of _insert_after."""
    parent = element.getparent()
    assert parent is not None
    previous = element.getprevious()
    if previous is not None:
        previous.tail = element.tail
    else:
        parent.text = element.tail
    parent.remove(element)


def _replace(old: etree._Element, new: etree._Element) -> None:
    new.tail = old.tail
    parent = old.getparent()
    assert parent is not None
    parent.replace(old, new)
