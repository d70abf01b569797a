"""libvirt's run-time files, read without talking to libvirt (the hook must never call back into it).

- per-domain memory directory: ``<memory_backing_dir>/libvirt/qemu/<id>-<name[:20]>`` (libvirt 9.0) or
  ``<memory_backing_dir>/<id>-<name[:20]>`` (newer upstream); both layouts are tried;
- status files ``<run_dir>/<name>.xml`` (``<domstatus pid=...><domain>...``) and pid files ``<name>.pid``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import HostError
from .xmlsafe import parse_stdlib

SHORT_NAME_MAX = 20  # libvirt's VIR_DOMAIN_SHORT_NAME_MAX


def short_name(dom_id: int | str, name: str) -> str:
    """The directory name libvirt gives a running domain's private files."""
    return f"{dom_id}-{name[:SHORT_NAME_MAX]}"


def domain_dir_candidates(backing_dir: Path, name: str, dom_id: str | None) -> list[Path]:
    """Existing per-domain memory directories for ``name``, best match first.

    With the domain id known (the ``id`` attribute of the live XML) only ``<id>-<name>`` counts: a
    directory of an earlier run of the same guest is never the one QEMU will map.  Without it, every
    ``<digits>-<name>``, newest first.
    """
    if dom_id is not None and not dom_id.isdigit():
        dom_id = None
    found: list[Path] = []
    for base in (backing_dir / "libvirt" / "qemu", backing_dir):
        if dom_id is not None:
            exact = base / short_name(dom_id, name)
            if exact.is_dir():
                found.append(exact)
            continue
        suffix = "-" + name[:SHORT_NAME_MAX]
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        matches = [
            Path(e.path) for e in entries
            if e.is_dir(follow_symlinks=False) and e.name.endswith(suffix) and e.name[: -len(suffix)].isdigit()
        ]
        found.extend(sorted(matches, key=lambda p: p.stat().st_mtime, reverse=True))
    return found


def all_domain_dirs(backing_dir: Path) -> Iterator[Path]:
    """Every per-domain memory directory under both layouts."""
    for base in (backing_dir / "libvirt" / "qemu", backing_dir):
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            head, _, rest = entry.name.partition("-")
            if rest and head.isdigit() and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


@dataclass(frozen=True)
class RunningDomain:
    name: str
    pid: int | None
    domain: ET.Element     # the <domain> element of the status file


def pid_file_names(name: str) -> list[str]:
    """Names the pid file of domain ``name`` may have, libvirt 9.0's first.

    libvirt 9.0 writes the name XML-escaped into the pid file's name (measured: ``q&apos;u.pid``, while the
    status file is ``q'u.xml``); other versions may not.
    """
    escaped = name
    for raw, entity in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"), ('"', "&quot;")):
        escaped = escaped.replace(raw, entity)
    return [f"{escaped}.pid"] if escaped == name else [f"{escaped}.pid", f"{name}.pid"]


def read_pid(run_dir: Path, name: str) -> int | None:
    """The QEMU pid libvirt recorded for ``name``, or None when there is no pid file."""
    for file_name in pid_file_names(name):
        path = run_dir / file_name
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise HostError(f"cannot read {path}: {err.strerror}") from None
        if not text.isdigit():
            raise HostError(f"cannot parse {path}: {text!r} is not a pid")
        return int(text)
    return None


def running_names(run_dir: Path) -> list[str]:
    """Names of the domains that have a status file, without parsing it.

    libvirt keeps ``<name>.xml`` for exactly the domains it runs; each also holds the live domain and every
    QEMU capability libvirt probed, so parsing them all would cost each prepare ~0.15 ms per running guest.
    """
    try:
        return sorted(p[: -len(".xml")] for p in os.listdir(run_dir) if p.endswith(".xml"))
    except OSError:
        return []


def running_domains(run_dir: Path) -> Iterator[RunningDomain]:
    """Domains with a status file; unreadable ones are skipped (a status file may be mid-write)."""
    for name in running_names(run_dir):
        try:
            raw = (run_dir / f"{name}.xml").read_bytes()
            root = parse_stdlib(raw)
        except (OSError, ET.ParseError, ValueError):
            continue
        domain = root if root.tag == "domain" else root.find("domain")
        if domain is None:
            continue
        pid_text = root.get("pid")
        yield RunningDomain(
            name=name,
            pid=int(pid_text) if pid_text and pid_text.isdigit() else None,
            domain=domain,
        )
