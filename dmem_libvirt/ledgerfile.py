"""Where the ledger lives in the state directory, and a lock-free peek into it for the hook.

libvirt runs two release calls after every stop (``stopped end``, ``release end``) and the second finds
nothing left to do: ``may_hold`` tells it so from the file's bytes, without the lock, a parse, or the
imports of the ledger module (json, re, the domain model).  Its only import is pathlib.
"""

from __future__ import annotations

from pathlib import Path

FILE_NAME = "ledger.json"


def may_hold(state_dir: Path, uuid: str) -> bool:
    """Could the ledger under ``state_dir`` hold an entry of ``uuid``?  False means surely not.

    A byte search, for the hook's release calls.  Any doubt (an unreadable file) answers True.
    """
    try:
        data = (Path(state_dir) / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # Entries store the uuid as a JSON string; a uuid needs no escaping.
    return f'"{uuid}"'.encode() in data
