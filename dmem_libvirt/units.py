"""Sizes at the edges: parse "2M"/"8GiB"/"4096" into bytes, print bytes in binary units.

Inside the program every size is an int of bytes; only this module turns text into
sizes and sizes into text.  Parsing is strict and quotes the offending text.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "tib": TiB,
}
# libvirt's <memory unit=...> names; 'KB'/'MB'... are powers of ten there.
LIBVIRT_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": KiB, "kib": KiB,
    "mb": 1000**2, "m": MiB, "mib": MiB,
    "gb": 1000**3, "g": GiB, "gib": GiB,
    "tb": 1000**4, "t": TiB, "tib": TiB,
    "pb": 1000**5, "p": 1 << 50, "pib": 1 << 50,
    "eb": 1000**6, "e": 1 << 60, "eib": 1 << 60,
}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from "2M", "2MiB", "8G", "4096" (binary units; a bare number is bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4K, 2M, 1G or a number of bytes)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def libvirt_bytes(value: str, unit: str | None) -> int:
    """Bytes from a libvirt scaled integer such as <memory unit='KiB'>1048576</memory> (default KiB)."""
    unit_key = (unit or "KiB").strip().lower()
    if unit_key not in LIBVIRT_UNITS:
        raise ValueError(f"unknown memory unit {unit!r}")
    text = (value or "").strip()
    if not text.isdigit():
        raise ValueError(f"not a memory size: {value!r}")
    return int(text) * LIBVIRT_UNITS[unit_key]


def format_size(n: int) -> str:
    """'8.0 GiB', '512.0 MiB', '1.998 GiB': one decimal, more only when one would hide a difference."""
    if n < 0:
        return "-" + format_size(-n)
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            value = n / unit
            for decimals in (1, 2, 3):
                if round(value, decimals) * unit == n:
                    break
            return f"{value:.{decimals}f} {name}"
    return f"{n} B"


def format_page_size(n: int) -> str:
    """'4 KiB', '2 MiB', '1 GiB': page sizes are exact powers of two."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"
