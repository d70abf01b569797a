import json
import multiprocessing
import os
import stat
from dataclasses import replace
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from dmem_libvirt import log
from dmem_libvirt.errors import LedgerError
from dmem_libvirt.ledger import VERSION, Book, Ledger, LedgerCorrupt, Reservation
from dmem_libvirt.ledgerfile import may_hold
from dmem_libvirt.units import GiB, MiB

BOOT = "0b7c2a4e-1111-4d2e-9c3a-000000000001"
OTHER_BOOT = "0b7c2a4e-2222-4d2e-9c3a-000000000002"
FORK = multiprocessing.get_context("fork")


def res(domain: str = "web01", file: str = "ram-node0", node: int = 0, size: int = GiB,
        **kw: object) -> Reservation:
    fields: dict[str, object] = dict(
        domain=domain, uuid=f"uuid-{domain}", node=node, bytes=size, page_size=2 * MiB, backend="dmemfs",
        file=file, state="reserved", origin="prepare", created=1700000000.5,
    )
    fields.update(kw)
    return Reservation(**fields)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.events: list[tuple[str, dict[str, object]]] = []

    def warning(self, message: str, domain: str | None = None) -> None:
        self.warnings.append(message)

    def event(self, action: str, domain: str | None = None, **details: object) -> None:
        self.events.append((action, details))


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(log, "warning", recorder.warning)
    monkeypatch.setattr(log, "event", recorder.event)
    return recorder


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "state", BOOT, lock_timeout=5.0)


def store(ledger: Ledger, *entries: Reservation) -> None:
    with ledger.transaction() as book:
        for entry in entries:
            book.add(entry)


def asides(ledger: Ledger) -> list[Path]:
    return sorted(ledger.state_dir.glob("ledger.json.corrupt-*"))


# ---- the file --------------------------------------------------------------------------------------


def test_reservations_survive_a_roundtrip_through_the_file(ledger: Ledger) -> None:
    pinned = res("db02", "pc.ram", node=1, size=512 * MiB, state="pinned", origin="reconnect+prepare",
                 path="/var/lib/libvirt/qemu/ram/libvirt/qemu/2-db02/pc.ram", inode=1234, pid=4321)
    store(ledger, res(), res(file="ram-node1", node=1), pinned)
    fresh = Ledger(ledger.state_dir, BOOT, lock_timeout=5.0)
    assert fresh.read() == [res(), res(file="ram-node1", node=1), pinned]
    document = json.loads(ledger.path.read_text())
    assert document["version"] == VERSION == 1
    assert document["boot_id"] == BOOT
    assert document["reservations"][2]["inode"] == 1234


def test_no_file_means_no_reservations_and_a_reading_transaction_writes_none(ledger: Ledger) -> None:
    assert ledger.read() == []
    with ledger.transaction() as book:
        assert book.reservations == []
    assert not ledger.path.exists()


def test_the_state_directory_is_created_private(ledger: Ledger) -> None:
    store(ledger, res())
    assert stat.S_IMODE(ledger.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert (ledger.state_dir / "lock").exists()


def test_an_unchanged_transaction_leaves_the_file_alone(ledger: Ledger) -> None:
    store(ledger, res())
    before = ledger.path.stat().st_ino
    with ledger.transaction() as book:
        book.replace_uuid("uuid-web01", book.for_uuid("uuid-web01"))
        assert not book.changed
    assert ledger.path.stat().st_ino == before


def test_an_exception_inside_a_transaction_writes_nothing(ledger: Ledger) -> None:
    store(ledger, res())
    before = ledger.path.read_bytes()
    with pytest.raises(RuntimeError), ledger.transaction() as book:
        book.add(res("db02"))
        book.remove_uuid("uuid-web01")
        raise RuntimeError("refused")
    assert ledger.path.read_bytes() == before
    assert ledger.read() == [res()]


def test_leftover_temp_files_are_ignored_and_cleaned_by_the_next_writer(ledger: Ledger) -> None:
    store(ledger, res())
    leftover = ledger.state_dir / ".ledger.json.tmp-99999"
    leftover.write_text('{"version": 1, "boot_')
    assert ledger.read() == [res()]
    with ledger.transaction():
        pass
    assert not leftover.exists()


# ---- boots, versions, corruption ----------------------------------------------------------------------


def test_reservations_of_an_earlier_boot_are_dropped_and_logged(ledger: Ledger, logged: Recorder) -> None:
    store(ledger, res(), res("db02"))
    after_reboot = Ledger(ledger.state_dir, OTHER_BOOT, lock_timeout=5.0)
    assert after_reboot.read() == []
    with after_reboot.transaction() as book:
        assert book.reservations == []
    assert logged.events == [("boot-changed", {"dropped": 2})]
    assert json.loads(ledger.path.read_text())["boot_id"] == OTHER_BOOT
    assert asides(ledger) == []


def valid_document(*entries: Reservation) -> dict[str, object]:
    return {"version": 1, "boot_id": BOOT, "written": 1700000001.0,
            "reservations": [e.to_json() for e in entries]}


def wrong_types() -> bytes:
    document = valid_document(res())
    document["reservations"][0]["bytes"] = "1G"  # type: ignore[index]
    return json.dumps(document).encode()


CORRUPT = {
    "truncated JSON": (json.dumps(valid_document(res(), res("db02")))[:150].encode(), "not valid JSON"),
    "wrong types": (wrong_types(), "reservation 0: field 'bytes' must be an integer, got '1G'"),
    "duplicate": (json.dumps(valid_document(res(), res(node=1))).encode(),
                  "ram-node0 of domain web01 (uuid uuid-web01) is booked twice"),
    "garbage bytes": (os.urandom(64) + b"\xff\xfe", "not UTF-8 text"),
    "empty file": (b"", "not valid JSON"),
    "unknown field": (json.dumps({**valid_document(), "extra": 1}).encode(), "unknown field 'extra'"),
    "path traversal": (json.dumps(valid_document(res(file="../../etc/passwd"))).encode(),
                       "field 'file' '../../etc/passwd' is not a plain file name"),
}


@pytest.mark.parametrize("damage", CORRUPT)
def test_a_corrupt_ledger_is_kept_aside_logged_and_rebuilt(ledger: Ledger, logged: Recorder, damage: str) -> None:
    data, reason = CORRUPT[damage]
    # What still reads as a valid entry is kept; the running guests fill in what it lost.
    kept = [res()] if damage == "duplicate" else []
    ledger.state_dir.mkdir()
    ledger.path.write_bytes(data)
    running = [res("db02", origin="rebuilt", state="pinned")]
    calls: list[int] = []

    def rebuild() -> list[Reservation]:
        calls.append(1)
        return running

    with ledger.transaction(rebuild=rebuild) as book:
        assert book.reservations == kept + running
    assert calls == [1]
    assert ledger.read() == kept + running
    [aside] = asides(ledger)
    assert aside.read_bytes() == data
    [warning] = logged.warnings
    assert reason in warning
    assert str(aside) in warning
    assert "added 1 reservations of running guests" in warning


@pytest.mark.parametrize("damage", CORRUPT.values(), ids=CORRUPT.keys())
def test_reading_a_corrupt_ledger_raises_and_leaves_it_in_place(ledger: Ledger,
                                                                damage: tuple[bytes, str]) -> None:
    data, reason = damage
    ledger.state_dir.mkdir()
    ledger.path.write_bytes(data)
    with pytest.raises(LedgerCorrupt) as caught:
        ledger.read()
    assert caught.value.line().startswith(f"dmem-libvirt: ledger {ledger.path} is corrupt: ")
    assert reason in caught.value.line()
    assert ledger.path.read_bytes() == data
    assert asides(ledger) == []


def test_a_corrupt_ledger_without_a_rebuild_is_an_error_and_is_not_emptied(ledger: Ledger) -> None:
    ledger.state_dir.mkdir()
    ledger.path.write_bytes(b"{")
    with pytest.raises(LedgerCorrupt), ledger.transaction() as book:
        book.add(res())
    assert ledger.path.read_bytes() == b"{"
    with pytest.raises(LedgerCorrupt):
        ledger.read()


def test_a_failing_rebuild_keeps_the_corrupt_ledger_for_the_next_attempt(ledger: Ledger) -> None:
    ledger.state_dir.mkdir()
    ledger.path.write_bytes(b"[1, 2")

    def rebuild() -> list[Reservation]:
        raise LedgerError("cannot list running guests")

    with pytest.raises(LedgerError, match="running guests"), ledger.transaction(rebuild=rebuild):
        pass
    assert ledger.path.read_bytes() == b"[1, 2"
    assert asides(ledger) == []


def test_a_newer_format_version_is_refused_naming_both_versions(ledger: Ledger) -> None:
    ledger.state_dir.mkdir()
    newer = json.dumps({"version": 2, "boot_id": BOOT, "format": "whatever 2 is"}).encode()
    ledger.path.write_bytes(newer)
    expected = (f"dmem-libvirt: ledger {ledger.path} has format version 2; "
                "this dmem-libvirt reads version 1 only")
    with pytest.raises(LedgerError) as caught:
        ledger.read()
    assert caught.value.line() == expected
    with pytest.raises(LedgerError) as caught, ledger.transaction(rebuild=lambda: [res()]) as book:
        book.add(res("db02"))
    assert caught.value.line() == expected
    assert not isinstance(caught.value, LedgerCorrupt)
    assert ledger.path.read_bytes() == newer
    assert asides(ledger) == []


# ---- reservations and the book ------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("node", True, "field 'node' must be an integer, got True"),
    ("node", -1, "field 'node' must be at least 0"),
    ("state", "zeroing", "field 'state' must be one of"),
    ("origin", "teleport", "unknown origin"),
    ("path", "relative/pc.ram", "field 'path' must be an absolute path"),
    ("uuid", "", "field 'uuid' must be a non-empty string"),
    ("colour", "blue", "unknown field 'colour'"),
])
def test_a_reservation_with_a_bad_field_is_refused_by_name(key: str, value: object, message: str) -> None:
    data = res().to_json()
    data[key] = value
    with pytest.raises(LedgerCorrupt, match=message):
        Reservation.from_json(data)


def test_a_reservation_missing_a_field_is_refused() -> None:
    data = res().to_json()
    del data["page_size"]
    with pytest.raises(LedgerCorrupt, match="missing field 'page_size'"):
        Reservation.from_json(data)


def test_booking_the_same_file_of_a_domain_twice_is_refused() -> None:
    book = Book([res()])
    with pytest.raises(LedgerError, match="ram-node0 of domain uuid uuid-web01 is already in the ledger"):
        book.add(res(node=1))
    with pytest.raises(LedgerError, match="already in the ledger"):
        book.replace_uuid("uuid-web01", [res(), res(size=2 * GiB)])
    assert book.reservations == [res()]
    assert not book.changed


def test_replace_and_remove_edit_one_domain_in_place() -> None:
    book = Book([res("a"), res("web01"), res("web01", "ram-node1"), res("z")])
    book.replace_uuid("uuid-web01", [replace(res("web01"), state="pinned", pid=77)])
    assert [(r.domain, r.file, r.state) for r in book.reservations] == [
        ("a", "ram-node0", "reserved"), ("web01", "ram-node0", "pinned"), ("z", "ram-node0", "reserved")]
    assert book.changed
    assert book.remove_uuid("uuid-a") == [res("a")]
    assert book.remove_uuid("uuid-a") == []
    assert book.remove_entry(res("z")) is True
    assert book.remove_entry(res("z")) is False
    assert [r.domain for r in book.reservations] == ["web01"]


# ---- many processes at once ------------------------------------------------------------------------


CAPACITY_SLOTS = 10
SLOT = 256 * MiB


def admit_one(state_dir: Path, index: int, barrier: Barrier) -> None:
    ledger = Ledger(state_dir, BOOT, lock_timeout=30.0)
    barrier.wait()
    with ledger.transaction() as book:
        if sum(r.bytes for r in book.reservations) + SLOT <= CAPACITY_SLOTS * SLOT:
            book.add(res(f"guest{index:02d}", size=SLOT))
    os._exit(0)


def test_twenty_simultaneous_admissions_fill_the_capacity_exactly_once(ledger: Ledger) -> None:
    barrier = FORK.Barrier(20)
    children = [FORK.Process(target=admit_one, args=(ledger.state_dir, i, barrier)) for i in range(20)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0] * 20
    admitted = ledger.read()
    assert len(admitted) == CAPACITY_SLOTS
    assert len({r.domain for r in admitted}) == CAPACITY_SLOTS
    assert sum(r.bytes for r in admitted) == CAPACITY_SLOTS * SLOT


# ---- pages the tool added to the kernel's pools -----------------------------------------------------


def test_pages_the_tool_grew_survive_a_roundtrip_and_zero_forgets_the_pool(ledger: Ledger) -> None:
    with ledger.transaction() as book:
        book.set_grown(0, 2 * MiB, 64)
        book.set_grown(1, GiB, 2)
    assert ledger.read_grown() == {(0, 2 * MiB): 64, (1, GiB): 2}
    assert json.loads(ledger.path.read_text())["grown"] == [
        {"node": 0, "page_size": 2 * MiB, "pages": 64}, {"node": 1, "page_size": GiB, "pages": 2}]
    with ledger.transaction() as book:
        book.set_grown(0, 2 * MiB, 0)
        book.set_grown(1, GiB, 0)
    assert ledger.read_grown() == {}
    assert "grown" not in json.loads(ledger.path.read_text())


def test_pages_grown_in_an_earlier_boot_are_forgotten(ledger: Ledger) -> None:
    with ledger.transaction() as book:
        book.set_grown(0, 2 * MiB, 64)
    assert Ledger(ledger.state_dir, OTHER_BOOT, lock_timeout=5.0).read_grown() == {}


@pytest.mark.parametrize(("grown", "message"), [
    ({"node": 0}, "field 'grown' must be a list"),
    ([{"node": 0}], "not {node, page_size, pages}"),
    ([{"node": 0, "page_size": 2097152, "pages": 0}], "field 'pages' must be at least 1"),
    ([{"node": 0, "page_size": 2097152, "pages": 1}] * 2, "lists node 0 page size 2097152 twice"),
])
def test_a_malformed_grown_count_makes_the_ledger_corrupt(ledger: Ledger, grown: object, message: str) -> None:
    store(ledger, res())
    document = json.loads(ledger.path.read_text())
    document["grown"] = grown
    ledger.path.write_text(json.dumps(document))
    with pytest.raises(LedgerCorrupt, match=message):
        ledger.read()


def test_may_hold_is_false_only_when_the_ledger_surely_lacks_the_uuid(tmp_path: Path) -> None:
    held = "6f9a4c1e-0000-4000-8000-000000000001"
    assert not may_hold(tmp_path, held)
    (tmp_path / "ledger.json").write_text(json.dumps({"reservations": [{"uuid": held}]}))
    assert may_hold(tmp_path, held)
    assert not may_hold(tmp_path, held.replace("1", "2"))
    assert may_hold(tmp_path / "ledger.json", held)  # not a directory: unreadable, so maybe
