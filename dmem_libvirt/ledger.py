"""The durable reservation ledger: which domain holds how many bytes of which pool, on which node.

One JSON file under the state directory, versioned and bound to the boot it was written in.  It is
only ever replaced atomically (temp file, fsync, rename, fsync of the directory), so a process killed
at any instruction leaves either the old or the new ledger.  Changes happen in ``transaction()``, under
the host lock; ``read()`` is a lock-free snapshot.  A damaged file is kept aside, never silently emptied:
every entry still readable in it is kept, running guests fill in the rest, and the log says what was
dropped.  The state directory must be ours and not writable by others; no file in it is followed
through a symbolic link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import log
from .atomic import temp_prefix, write_atomically
from .domain import backing_file_problem
from .errors import LedgerError
from .ledgerfile import FILE_NAME as _FILE_NAME
from .lock import HostLock

VERSION = 1

STATES = frozenset({"reserved", "pinned"})
ORIGINS = frozenset({"prepare", "start", "migrate", "restore", "reconnect", "rebuilt"})

_LOCK_NAME = "lock"
_ENVELOPE = ("version", "boot_id", "written", "reservations", "grown")


class LedgerCorrupt(LedgerError):
    """The ledger file cannot be trusted: not JSON, ill-typed, or double-books a file."""


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerCorrupt(f"field '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise LedgerCorrupt(f"field '{name}' must be at least {minimum}, got {value}")
    return value


def _str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise LedgerCorrupt(f"field '{name}' must be a non-empty string, got {value!r}")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerCorrupt(f"field '{name}' must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Reservation:
    """One guest memory backend file's claim on a host node's pool."""

    domain: str
    uuid: str
    node: int
    bytes: int
    page_size: int
    backend: str
    file: str
    state: str
    origin: str
    created: float
    path: str | None = None
    inode: int | None = None
    pid: int | None = None
    pid_start: int | None = None     # the pid's start time (clock ticks after boot): a recycled pid differs

    @property
    def key(self) -> tuple[str, str]:
        """What may be booked only once: the domain's uuid and its backend file."""
        return (self.uuid, self.file)

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> Reservation:
        """Strict inverse of to_json: raises LedgerCorrupt naming the first bad or unknown field."""
        if not isinstance(d, Mapping):
            raise LedgerCorrupt(f"a reservation must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LedgerCorrupt(f"unknown field '{unknown[0]}'")
        optional = {"path", "inode", "pid", "pid_start"}
        missing = sorted(known - optional - set(d))
        if missing:
            raise LedgerCorrupt(f"missing field '{missing[0]}'")
        state = _str("state", d["state"])
        if state not in STATES:
            raise LedgerCorrupt(f"field 'state' must be one of {sorted(STATES)}, got {state!r}")
        origin = _str("origin", d["origin"])
        # Re-adopted entries keep their history, e.g. "reconnect+prepare".
        if not set(origin.split("+")) <= ORIGINS:
            raise LedgerCorrupt(f"field 'origin' has an unknown origin: {origin!r}")
        file = d["file"]
        # The file name is joined to the domain's memory directory when pages are given back.
        problem = backing_file_problem(file)
        if problem:
            raise LedgerCorrupt(f"field 'file' {file!r} {problem}")
        assert isinstance(file, str)
        path = d.get("path")
        if path is not None and not (isinstance(path, str) and path.startswith("/")):
            raise LedgerCorrupt(f"field 'path' must be an absolute path or null, got {path!r}")
        inode = d.get("inode")
        pid = d.get("pid")
        pid_start = d.get("pid_start")
        return cls(
            domain=_str("domain", d["domain"]),
            uuid=_str("uuid", d["uuid"]),
            node=_int("node", d["node"], 0),
            bytes=_int("bytes", d["bytes"], 0),
            page_size=_int("page_size", d["page_size"], 1),
            backend=_str("backend", d["backend"]),
            file=file,
            state=state,
            origin=origin,
            created=_number("created", d["created"]),
            path=path,
            inode=None if inode is None else _int("inode", inode, 0),
            pid=None if pid is None else _int("pid", pid, 1),
            pid_start=None if pid_start is None else _int("pid_start", pid_start, 0),
        )


def _duplicate(entries: Iterable[Reservation]) -> Reservation | None:
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.key in seen:
            return entry
        seen.add(entry.key)
    return None


def _double_booked(entry: Reservation) -> LedgerError:
    return LedgerError(f"{entry.file} of domain uuid {entry.uuid} is already in the ledger", entry.domain)


@dataclass
class Book:
    """The reservations inside one transaction; every change sets ``changed``."""

    reservations: list[Reservation] = field(default_factory=list)
    changed: bool = False
    # (host node, page size) -> pages the tool added to that kernel pool and has not given back yet.
    grown: dict[tuple[int, int], int] = field(default_factory=dict)
    # Entries the transaction took from running guests because the file had lost them.
    recovered: list[Reservation] = field(default_factory=list)

    def set_grown(self, node: int, page_size: int, pages: int) -> None:
        """Record how many pages of that pool the tool added (0 forgets the pool)."""
        key = (node, page_size)
        if self.grown.get(key, 0) == pages:
            return
        if pages:
            self.grown[key] = pages
        else:
            self.grown.pop(key, None)
        self.changed = True

    def for_uuid(self, uuid: str) -> list[Reservation]:
        return [r for r in self.reservations if r.uuid == uuid]

    def add(self, r: Reservation) -> None:
        """Record ``r``; a second entry for the same uuid and file raises LedgerError."""
        if any(r.key == other.key for other in self.reservations):
            raise _double_booked(r)
        self.reservations.append(r)
        self.changed = True

    def remove_entry(self, r: Reservation) -> bool:
        """Drop the entry booked for r's uuid and file; False if there was none."""
        kept = [other for other in self.reservations if other.key != r.key]
        if len(kept) == len(self.reservations):
            return False
        self.reservations = kept
        self.changed = True
        return True

    def remove_uuid(self, uuid: str) -> list[Reservation]:
        """Drop every entry of ``uuid`` and return them."""
        removed = self.for_uuid(uuid)
        if removed:
            self.reservations = [r for r in self.reservations if r.uuid != uuid]
            self.changed = True
        return removed

    def replace_uuid(self, uuid: str, new: Iterable[Reservation]) -> None:
        """Make ``new`` the entries of ``uuid``, in the place its first old entry had."""
        entries = list(new)
        for entry in entries:
            if entry.uuid != uuid:
                raise ValueError(f"replace_uuid({uuid!r}) got an entry of uuid {entry.uuid!r}")
        duplicate = _duplicate(entries)
        if duplicate is not None:
            raise _double_booked(duplicate)
        positions = [i for i, r in enumerate(self.reservations) if r.uuid == uuid]
        at = positions[0] if positions else len(self.reservations)
        others = [r for r in self.reservations if r.uuid != uuid]
        at -= sum(1 for i in positions if i < at)
        result = others[:at] + entries + others[at:]
        if result != self.reservations:
            self.reservations = result
            self.changed = True



@dataclass(frozen=True)
class _Loaded:
    boot_id: str
    reservations: list[Reservation]
    grown: dict[tuple[int, int], int]


_GROWN_FIELDS = frozenset({"node", "page_size", "pages"})


def _parse_grown(raw: object) -> dict[tuple[int, int], int]:
    """The optional "grown" list: [{"node": N, "page_size": bytes, "pages": n}, ...]."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise LedgerCorrupt(f"field 'grown' must be a list, got {raw!r}")
    grown: dict[tuple[int, int], int] = {}
    for item in raw:
        if not isinstance(item, dict) or set(item) != _GROWN_FIELDS:
            raise LedgerCorrupt(f"field 'grown' holds {item!r}, not {{node, page_size, pages}}")
        key = (_int("node", item["node"], 0), _int("page_size", item["page_size"], 1))
        if key in grown:
            raise LedgerCorrupt(f"field 'grown' lists node {key[0]} page size {key[1]} twice")
        grown[key] = _int("pages", item["pages"], 1)
    return grown


# The envelope's boot id, found in a file too damaged to parse as a whole.
_BOOT_ID_FIELD = re.compile(r'"boot_id"\s*:\s*"([^"\\]*)"')


@dataclass(frozen=True)
class Salvage:
    """What a damaged ledger file still says: every entry that reads as valid, and what was left out."""

    reason: str
    boot_id: str | None
    reservations: list[Reservation]
    dropped: list[str]
    grown: dict[tuple[int, int], int] = field(default_factory=dict)

    def summary(self) -> str:
        dropped = "; ".join(self.dropped) if self.dropped else "no readable entry"
        return f"{self.reason} (kept {len(self.reservations)} readable reservations, dropped: {dropped})"


def salvage(data: bytes, reason: str) -> Salvage:
    """Every valid reservation object in ``data``, wherever it is, first of each (uuid, file) kept.

    A ledger is damaged by hand edits, a full disk or a foreign writer, never by our own crash (writes are
    atomic): what survives is whole JSON objects, so each one is tried on its own.
    """
    text = data.decode("utf-8", "replace")
    found = _BOOT_ID_FIELD.search(text)
    decoder = json.JSONDecoder()
    kept: list[Reservation] = []
    dropped: list[str] = []
    seen: set[tuple[str, str]] = set()
    grown: dict[tuple[int, int], int] = {}
    index = 0
    position = text.find("{")
    while position >= 0:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            value, end = None, position + 1
        if isinstance(value, dict) and set(value) == _GROWN_FIELDS:
            # A record of pages the tool added to a pool: kept when it reads, so they can be given back.
            with contextlib.suppress(LedgerCorrupt):
                grown.update(_parse_grown([value]))
            position = text.find("{", end)
        elif isinstance(value, dict) and "reservations" not in value:
            try:
                entry = Reservation.from_json(value)
                if entry.key in seen:
                    raise LedgerCorrupt(f"{entry.file} of domain {entry.domain} is booked twice")
                seen.add(entry.key)
                kept.append(entry)
            except LedgerCorrupt as err:
                dropped.append(f"reservation {index} ({value.get('domain', '?')}): {err.message}")
            index += 1
            position = text.find("{", end)
        else:
            # The envelope (or not JSON at all): look inside it for the entries.
            position = text.find("{", position + 1)
    return Salvage(reason, found.group(1) if found else None, kept, dropped, grown)


def state_dir_problem(directory: Path) -> str | None:
    """Why the state directory must not be trusted, or None (also when it does not exist yet)."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot examine state directory {directory}: {err.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return f"state directory {directory} is a symbolic link; make it a directory"
    if not stat.S_ISDIR(info.st_mode):
        return f"state directory {directory} is not a directory"
    euid = os.geteuid()
    owner = "root" if euid == 0 else f"uid {euid}"
    if info.st_uid != euid:
        return f"state directory {directory} is owned by uid {info.st_uid}, not {owner}; chown {owner} {directory}"
    if info.st_mode & 0o022:
        # Anyone who can write there can swap the ledger or the lock: bookings would mean nothing.
        return (f"state directory {directory} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod go-w {directory}")
    return None


class Ledger:
    """The ledger file ``<state_dir>/ledger.json`` and its lock ``<state_dir>/lock``."""

    def __init__(self, state_dir: Path, boot_id: str, *, lock_timeout: float) -> None:
        self.state_dir = Path(state_dir)
        self.boot_id = boot_id
        self.lock_timeout = lock_timeout
        self.path = self.state_dir / _FILE_NAME
        self.lock_path = self.state_dir / _LOCK_NAME

    # ---- reading -----------------------------------------------------------------------------------

    def _read_file(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise LedgerError(f"ledger {self.path} is a symbolic link; refusing to follow it") from None
            raise LedgerError(f"cannot read ledger {self.path}: {err.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise LedgerError(f"cannot read ledger {self.path}: {err.strerror}") from None

    def _examine(self) -> _Loaded | Salvage | None:
        """The file's contents, what survives of them when damaged, or None if there is no file."""
        data = self._read_file()
        if data is None:
            return None
        try:
            return self._parse(data)
        except LedgerCorrupt as err:
            return salvage(data, f"ledger {self.path} is corrupt: {err.message}")

    def _parse(self, data: bytes) -> _Loaded:
        try:
            raw: Any = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise LedgerCorrupt("not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise LedgerCorrupt(f"not valid JSON ({err.msg} at byte {err.pos} of {len(data)})") from None
        if not isinstance(raw, dict):
            raise LedgerCorrupt(f"top level must be an object, got {type(raw).__name__}")
        version = raw.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            # An upgrade/downgrade mix-up, not damage: leave the file for the newer program.
            raise LedgerError(f"ledger {self.path} has format version {version}; "
                              f"this dmem-libvirt reads version {VERSION} only")
        if version != VERSION or isinstance(version, bool):
            raise LedgerCorrupt(f"field 'version' must be {VERSION}, got {version!r}")
        unknown = sorted(set(raw) - set(_ENVELOPE))
        if unknown:
            raise LedgerCorrupt(f"unknown field '{unknown[0]}'")
        boot_id = _str("boot_id", raw.get("boot_id"))
        _number("written", raw.get("written"))
        entries = raw.get("reservations")
        if not isinstance(entries, list):
            raise LedgerCorrupt(f"field 'reservations' must be a list, got {entries!r}")
        reservations: list[Reservation] = []
        for index, entry in enumerate(entries):
            try:
                reservations.append(Reservation.from_json(entry))
            except LedgerCorrupt as err:
                raise LedgerCorrupt(f"reservation {index}: {err.message}") from None
        duplicate = _duplicate(reservations)
        if duplicate is not None:
            raise LedgerCorrupt(f"{duplicate.file} of domain {duplicate.domain} "
                                f"(uuid {duplicate.uuid}) is booked twice")
        return _Loaded(boot_id, reservations, _parse_grown(raw.get("grown")))

    def _this_boot(self, boot_id: str | None, reservations: list[Reservation]) -> list[Reservation]:
        # A damaged file whose boot id is unreadable keeps its entries: booking too much is safe, and
        # collecting orphans frees what no live guest owns.
        return reservations if boot_id in (None, self.boot_id) else []

    def read(self) -> list[Reservation]:
        """A snapshot without the lock: [] if absent or from another boot; LedgerCorrupt if damaged."""
        found = self._examine()
        if isinstance(found, Salvage):
            raise LedgerCorrupt(found.reason)
        return [] if found is None else self._this_boot(found.boot_id, found.reservations)

    def snapshot(self) -> tuple[list[Reservation], str | None]:
        """For read-only views: the reservations, and over a damaged file what still reads plus why."""
        found = self._examine()
        if found is None:
            return [], None
        if isinstance(found, Salvage):
            return self._this_boot(found.boot_id, found.reservations), found.summary()
        return self._this_boot(found.boot_id, found.reservations), None

    def read_grown(self) -> dict[tuple[int, int], int]:
        """A snapshot of the pages the tool added per (node, page size), without the lock."""
        found = self._examine()
        if found is None or found.boot_id not in (None, self.boot_id):
            return {}
        return found.grown

    # ---- changing ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, rebuild: Callable[[], Iterable[Reservation]] | None = None,
                    timeout: float | None = None) -> Iterator[Book]:
        """Yield the Book under the host lock; write it back atomically if the block ends normally.

        Over a damaged file the Book holds every entry still readable plus, from ``rebuild``, the running
        guests' entries it lost; without ``rebuild`` a damaged file raises LedgerCorrupt and stays.
        """
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise LedgerError(f"cannot create state directory {self.state_dir}: {err.strerror}") from None
        problem = state_dir_problem(self.state_dir)
        if problem:
            raise LedgerError(problem)
        with HostLock(self.lock_path, self.lock_timeout if timeout is None else timeout):
            self._remove_stale_temps()
            found = self._examine()
            damaged = found if isinstance(found, Salvage) else None
            reset = False
            added = 0
            if damaged is not None:
                if rebuild is None:
                    # Moving it aside now would leave a poorer ledger for the next caller.
                    raise LedgerCorrupt(damaged.reason)
                this_boot = damaged.boot_id in (None, self.boot_id)
                book = Book(self._this_boot(damaged.boot_id, damaged.reservations),
                            grown=damaged.grown if this_boot else {})
                keys = {entry.key for entry in book.reservations}
                for entry in rebuild():
                    if entry.key not in keys:
                        keys.add(entry.key)
                        book.reservations.append(entry)
                        book.recovered.append(entry)
                        added += 1
            elif found is None:
                # Deleted (or never written): the running guests' bookings are still true.
                running = list(rebuild()) if rebuild is not None else []
                book = Book(list(running), recovered=running)
                reset = bool(running)
            elif found.boot_id != self.boot_id:
                log.event("boot-changed", dropped=len(found.reservations))
                book, reset = Book(), True
            else:
                book = Book(found.reservations, grown=found.grown)
            yield book
            if damaged is not None:
                aside = self._keep_aside()
                self._write(book)
                log.warning(f"{damaged.summary()}; kept as {aside}, "
                            f"added {added} reservations of running guests it had lost")
            elif book.changed or reset:
                self._write(book)

    def _keep_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for attempt in range(100):
            aside = self.path.with_name(f"{_FILE_NAME}.corrupt-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                # A hard link, not a rename: until the rebuilt ledger replaces the corrupt one, a crash
                # must not leave the ledger absent (absent reads as empty).
                os.link(self.path, aside)
            except FileExistsError:
                continue
            except OSError as err:
                raise LedgerError(f"cannot keep corrupt ledger {self.path} as {aside}: "
                                  f"{err.strerror}") from None
            return aside
        raise LedgerError(f"cannot keep corrupt ledger {self.path}: too many copies from {stamp}")

    def _remove_stale_temps(self) -> None:
        # Only a writer holding the lock creates temp files, and we hold it: any left were
        # abandoned by a killed process.
        for stale in self.state_dir.glob(temp_prefix(self.path) + "*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _write(self, book: Book) -> None:
        duplicate = _duplicate(book.reservations)
        if duplicate is not None:
            raise _double_booked(duplicate)
        document: dict[str, object] = {
            "version": VERSION,
            "boot_id": self.boot_id,
            "written": time.time(),
            "reservations": [r.to_json() for r in book.reservations],
        }
        if book.grown:
            document["grown"] = [{"node": node, "page_size": size, "pages": pages}
                                 for (node, size), pages in sorted(book.grown.items())]
        data = (json.dumps(document, indent=1) + "\n").encode("utf-8")
        try:
            # Temp file, fsync, rename, fsync of the directory: a power cut leaves the old or the new ledger.
            write_atomically(self.path, data)
        except OSError as err:
            raise LedgerError(f"cannot write ledger {self.path}: {err.strerror}") from None
