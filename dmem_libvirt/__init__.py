"""dmem-libvirt: run libvirt/KVM guests on reserved host memory.

The package is imported by the libvirt hook on every guest operation, so this
file imports nothing: each module pulls in only what it needs.
"""

__version__ = "0.1.0"

# The namespace of the <metadata> element that marks a domain as ours.  Defined here, where importing
# costs nothing, because the hook searches every guest's raw XML for it before importing anything else.
XMLNS = "http://dmem-libvirt.org/xmlns/domain/1"


def may_concern_us(xml: bytes) -> bool:
    """Could this domain be ours or file-backed?  A byte search, no parsing: the hook lets the rest pass."""
    return XMLNS.encode() in xml or b"<memoryBacking" in xml
