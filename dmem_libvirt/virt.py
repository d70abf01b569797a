"""The libvirt connection: the only module that imports ``libvirt``.

Define-time commands reach libvirt through the small `Connection` protocol, so tests can hand in
libvirt's own ``test:///default`` driver or a double for the failures it cannot produce.  libvirt's
errors become one-line LibvirtError; libvirt itself prints nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import LibvirtError

XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE
XML_SECURE = 1    # VIR_DOMAIN_XML_SECURE: keep passwords, we define the XML back


class DomainHandle(Protocol):
    def name(self) -> str: ...
    def XMLDesc(self, flags: int = 0) -> str: ...
    def isActive(self) -> int: ...


class Connection(Protocol):
    def lookupByName(self, name: str) -> DomainHandle: ...
    def defineXML(self, xml: str) -> DomainHandle: ...


def _message(err: Exception) -> str:
    getter = getattr(err, "get_error_message", None)
    text = getter() if callable(getter) else None
    return " ".join(str(text or err).split())


def _silence(_context: object, _error: object) -> None:
    return None


def connect(uri: str | None) -> Connection:
    """Open ``uri`` (None: libvirt's default) or raise LibvirtError naming it."""
    import libvirt

    # libvirt's default handler prints every error on stderr itself ("libvirt: XML-RPC error : ..."), before
    # ours: each failure must be one line, so its message is folded into ours instead.
    libvirt.registerErrorHandler(_silence, None)
    try:
        conn: Any = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot connect to libvirt at {uri or 'the default URI'}: {_message(err)}") from None
    return conn  # type: ignore[no-any-return]


def lookup(conn: Connection, name: str) -> DomainHandle:
    try:
        return conn.lookupByName(name)
    except Exception as err:  # libvirt.libvirtError, without importing libvirt for test doubles
        raise LibvirtError(f"no such domain: {_message(err)}", name) from None


def inactive_xml(dom: DomainHandle) -> str:
    """The persistent definition, secrets included (it is defined back)."""
    try:
        return dom.XMLDesc(XML_INACTIVE | XML_SECURE)
    except Exception as err:
        raise LibvirtError(f"cannot read the definition: {_message(err)}", dom.name()) from None


def define(conn: Connection, name: str, xml: str) -> None:
    try:
        conn.defineXML(xml)
    except Exception as err:
        raise LibvirtError(f"libvirt refused the new definition: {_message(err)}", name) from None
