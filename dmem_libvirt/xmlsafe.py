"""The one policy for reading XML that arrives from outside: bounded in size, no DOCTYPE, no entities.

The command parses with lxml (domxml.parse), the hook and libvirt's status files with the stdlib parser;
both apply ``refusal`` to the raw bytes first, and the stdlib parser below also refuses a DOCTYPE that an
encoding hid from the byte search.  Importing this module imports nothing: the hook reads stdin with it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

# Far above any real domain (hundreds of KiB with every device), far below a memory problem.
MAX_XML_BYTES = 10 * 1024 * 1024


def refusal(raw: bytes, what: str = "domain XML") -> str | None:
    """Why ``raw`` is not read at all, or None."""
    if not raw.strip():
        return f"{what} is empty"
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        # libvirt never writes a DOCTYPE; one here can only smuggle entities (expansion bombs, local files).
        return f"{what} has a DOCTYPE or entity declarations; refusing it"
    if len(raw) > MAX_XML_BYTES:
        from .units import format_size

        # A bounded reader stops one byte past the limit: it cannot know the real size.
        more = " or more" if len(raw) == MAX_XML_BYTES + 1 else ""
        return f"{what} is {format_size(len(raw))}{more}; refusing more than {format_size(MAX_XML_BYTES)}"
    return None


class Refused(ValueError):
    """The document has a DOCTYPE (found by the parser, whatever the document's encoding)."""


def parse_stdlib(raw: bytes) -> Element:
    """The root element of ``raw`` by xml.etree, stopped at any DOCTYPE: raises Refused or ParseError."""
    import xml.etree.ElementTree as ET

    class Builder(ET.TreeBuilder):
        # The parser announces a DOCTYPE before reading its internal subset: no entity is ever declared.
        def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
            raise Refused("domain XML has a DOCTYPE or entity declarations; refusing it")

    parser = ET.XMLParser(target=Builder())
    parser.feed(raw)
    return parser.close()
