"""Event counters since boot, kept durable next to the ledger: admissions, refusals, hook failures.

``<state_dir>/counters.json`` holds, for the boot it was written in, how many times the hook admitted a
guest (per operation), refused one (per reason class, see errors.DmemError.reason) and failed where it
must not (per operation).  A file from an earlier boot, or an unreadable one, counts from zero again.
Updates take their own lock, never the host lock: counting must not delay an admission decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_atomically
from .errors import ERROR_REASONS, LedgerError, LibvirtError
from .lock import HostLock

VERSION = 1
FILE_NAME = "counters.json"
LOCK_NAME = "counters.lock"
LOCK_TIMEOUT = 2.0

# Every series starts at 0 so that a rate or increase over the first event is seen (Prometheus advice).
FAMILIES: dict[str, tuple[str, ...]] = {
    # A guest arriving by migration or restore is placed at migrate/restore begin and admitted at prepare.
    "admissions": ("prepare", "start"),
    # The hook never talks to libvirt: LibvirtError is the command's alone.
    "refusals": tuple(reason for reason in ERROR_REASONS if reason != LibvirtError.reason),
    "hook_failures": ("prepare", "start", "started", "release", "reconnect", "migrate", "restore"),
}

Counts = dict[str, dict[str, int]]


def zero() -> Counts:
    return {family: dict.fromkeys(labels, 0) for family, labels in FAMILIES.items()}


def read(state_dir: Path, boot_id: str) -> Counts:
    """This boot's counts (zeros when there are none yet)."""
    counts = zero()
    try:
        raw: Any = json.loads((state_dir / FILE_NAME).read_bytes())
    except (OSError, ValueError):
        return counts
    if not isinstance(raw, dict) or raw.get("version") != VERSION or raw.get("boot_id") != boot_id:
        return counts
    for family, labels in counts.items():
        stored = raw.get(family)
        if not isinstance(stored, dict):
            continue
        for label in labels:
            value = stored.get(label)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                labels[label] = value
    return counts


def add(state_dir: Path, boot_id: str, family: str, label: str) -> None:
    """Count one event; raises LedgerError when the state directory cannot be written."""
    if label not in FAMILIES[family]:
        raise ValueError(f"unknown {family} label {label!r}")
    path = state_dir / FILE_NAME
    with HostLock(state_dir / LOCK_NAME, LOCK_TIMEOUT):
        counts = read(state_dir, boot_id)
        counts[family][label] += 1
        document = {"version": VERSION, "boot_id": boot_id, **counts}
        try:
            # No fsync: counts of this boot mean nothing after a power cut, which starts a new boot.
            write_atomically(path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode(), sync=False)
        except OSError as err:
            raise LedgerError(f"cannot write counters {path}: {err.strerror}") from None
