"""CPU and node lists in the one syntax the kernel and libvirt share: "0-3,8,^2" as a set.

The kernel prints ranges and single numbers; libvirt (virBitmapParse) adds "^N", which removes one
number, applied left to right ("0-3,^2,2" is 0-3), and refuses "^2-3", empty items and backwards
ranges.  Host reading and domain reading both call ``parse_cpulist``.
"""

from __future__ import annotations


def parse_cpulist(text: str) -> frozenset[int]:
    """The set a list like "0-3,^2,8" names; "" (a node without CPUs) is empty.  ValueError quotes the text."""
    body = text.strip()
    if not body:
        return frozenset()
    cpus: set[int] = set()
    for item in body.split(","):
        part = item.strip()
        exclude = part.startswith("^")
        if exclude:
            part = part[1:]
        first, dash, last = part.partition("-")
        try:
            low = _number(first, strict_start=exclude)
            if not dash:
                (cpus.discard if exclude else cpus.add)(low)
                continue
            if exclude:
                raise ValueError(f"'^{part}': an exclusion takes one number, not a range")
            high = _number(last, strict_start=False)
            if high < low:
                raise ValueError(f"range {part.strip()!r} runs backwards")
        except ValueError as err:
            raise ValueError(f"not a CPU list: {text!r} ({err})") from None
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def _number(text: str, *, strict_start: bool) -> int:
    stripped = text.strip()
    if not stripped.isascii() or not stripped.isdigit() or (strict_start and text[:1] != stripped[:1]):
        raise ValueError(f"{text!r} is not a CPU number")
    return int(stripped)
