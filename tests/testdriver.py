"""A domain as libvirt itself formats it, through its test:///default driver (the formatter every driver shares)."""

from __future__ import annotations

import pytest


def libvirt_formatted(xml: str) -> bytes:
    """``xml`` defined and dumped back (inactive) by libvirt: the element order and indentation it writes."""
    try:
        import libvirt
    except ImportError:
        pytest.fail("libvirt-python is missing: apt-get install libvirt-dev pkg-config gcc, "
                    "then pip install libvirt-python")
    conn = libvirt.open("test:///default")
    try:
        domain = conn.defineXML(xml)
        try:
            return domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
        finally:
            domain.undefine()
    finally:
        conn.close()
