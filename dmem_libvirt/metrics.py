"""`status` as Prometheus metrics, in the text exposition format node_exporter's textfile collector reads.

Everything comes from `status.collect` (so the metrics and `status --json` never disagree): per host node
and page size the pool's total, free, reserved and pinned bytes; per domain the bytes it holds; the
hook's admissions, refusals (per reason class) and failures since boot; the `struct page` memory saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import write_atomically
from .errors import DmemError

PREFIX = "dmem_libvirt_"

POOL_GAUGES = (
    ("total", "Bytes of reserved memory the backend has on this host node."),
    ("free", "Bytes the backend reports free on this host node (pinned pages are taken, reserved ones not)."),
    ("reserved", "Bytes admitted for guests on this host node and not yet pinned."),
    ("pinned", "Bytes pinned (allocated, zeroed, handed to QEMU) for guests on this host node."),
)
COUNTERS = (
    ("admissions", "operation", "Guests admitted by the hook since boot, per hook operation."),
    ("refusals", "reason", "Guest operations the hook refused since boot, per reason class."),
    ("hook_failures", "operation", "Hook calls that failed unexpectedly or could not complete since boot."),
)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], int]]) -> Iterator[str]:
    yield f"# HELP {PREFIX}{name} {help_text}"
    yield f"# TYPE {PREFIX}{name} {kind}"
    for labels, value in samples:
        yield f"{PREFIX}{name}{_labels(**labels)} {value}"


def render(status: dict[str, Any]) -> str:
    """The text exposition of a `status.collect` result."""
    lines = list(_family("info", "gauge", "The backend and program version; always 1.", [
        ({"backend": status["backend"], "emulated": str(status["emulated"]).lower(), "mount": status["mount"],
          "version": __version__}, 1)]))
    for field, help_text in POOL_GAUGES:
        lines += _family(f"pool_{field}_bytes", "gauge", help_text,
                         [({"node": pool["node"], "page_size": pool["page_size"]}, pool[field])
                          for pool in status["pools"]])
    lines += _family("domain_reserved_bytes", "gauge",
                     "Bytes of reserved memory a domain holds (reserved or pinned), all host nodes together.",
                     [({"domain": dom["name"], "uuid": dom["uuid"]}, dom["bytes"]) for dom in status["domains"]])
    for family, label, help_text in COUNTERS:
        lines += _family(f"{family}_total", "counter", help_text,
                         [({label: key}, value) for key, value in sorted(status["counters"][family].items())])
    lines += _family("struct_page_saved_bytes", "gauge",
                     "Memory the pools save by having no struct page (64 bytes per 4 KiB page).",
                     [({}, status["struct_page_saved"])])
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` atomically, world-readable (node_exporter runs as its own user); rewritten every few
    seconds, so not worth an fsync."""
    if path.suffix != ".prom":
        raise DmemError(f"textfile {path} must end in .prom: node_exporter's textfile collector reads only *.prom")
    try:
        write_atomically(path, text.encode(), mode=0o644, sync=False)
    except OSError as err:
        raise DmemError(f"cannot write the metrics to {path}: {err.strerror}") from None
