"""A guest's life as the hook sees it: admit, pin, verify, unpin, re-adopt, receive, collect orphans.

Driven through `hook.main` on the Rig of tests/test_hook.py (emulated dmemfs on a real tmpfs, fake
debugfs counters, fake run dir and /proc).  Pinned files really are created, bound to node 0 of this
machine and zeroed, so guests that start are placed on host node 0; two-node admission is exercised at
prepare, which needs no real second node.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import syslog
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree
from test_hook import PAGE, QEMU_GID, QEMU_UID, REPO, Call, Rig, enabled, guest_xml, live, start_guest

from dmem_libvirt import define, numa
from dmem_libvirt.backends.emulated import DIRTY_PATTERN
from dmem_libvirt.ledger import Ledger, Reservation
from dmem_libvirt.pin import scan_for
from dmem_libvirt.units import MiB

WEB = "web01"
DB = "db02"


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every syslog line the hook writes."""
    lines: list[str] = []
    monkeypatch.setattr(syslog, "syslog", lambda *args: lines.append(str(args[-1])))
    return lines


def summary(entries: list[Reservation]) -> list[tuple[object, ...]]:
    return sorted((e.domain, e.node, e.bytes, e.page_size, e.file, e.state, e.origin) for e in entries)


def zero_filled(path: Path) -> bool:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as view:
        return view.read().count(0) == len(view)


# ---- prepare begin: admission ------------------------------------------------------------------------


def test_prepare_records_one_reservation_per_guest_cell_on_its_node(rig: Rig) -> None:
    xml = enabled(guest_xml(WEB, [16 * MiB, 32 * MiB]), [0, 1])
    free = rig.free_pages(0), rig.free_pages(1)
    assert rig.call(WEB, "prepare", "begin", live(xml, 1)) == Call(0, "", "")
    entries = rig.reservations()
    assert summary(entries) == [(WEB, 0, 16 * MiB, PAGE, "ram-node0", "reserved", "prepare"),
                                (WEB, 1, 32 * MiB, PAGE, "ram-node1", "reserved", "prepare")]
    assert {e.uuid for e in entries} == {etree.fromstring(xml).findtext("uuid")}
    # Admission books pages; only pinning takes them from the pool.
    assert (rig.free_pages(0), rig.free_pages(1)) == free


def test_prepare_of_a_guest_without_cells_reserves_its_whole_memory_on_one_node(rig: Rig) -> None:
    xml = enabled(guest_xml(WEB, memory=24 * MiB), [1])
    assert rig.call(WEB, "prepare", "begin", live(xml, 1)).code == 0
    assert summary(rig.reservations()) == [(WEB, 1, 24 * MiB, PAGE, "pc.ram", "reserved", "prepare")]


def test_prepare_refusal_names_node_and_numbers_and_leaves_the_ledger_unchanged(rig: Rig) -> None:
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [48 * MiB]), [1]), 1)).code == 0
    ledger = rig.config.state.dir / "ledger.json"
    before = ledger.read_bytes()
    web = live(enabled(guest_xml(WEB, [16 * MiB, 32 * MiB]), [0, 1]), 2)
    result = rig.call(WEB, "prepare", "begin", web)
    assert result == Call(1, "", "dmem-libvirt: web01: guest cell 1 needs 32.0 MiB of 2 MiB dmem pages on host "
                                 "node 1; 64.0 MiB free, 48.0 MiB reserved by db02\n")
    assert ledger.read_bytes() == before


def test_prepare_counts_pages_already_pinned_by_running_guests(rig: Rig) -> None:
    start_guest(rig, DB, enabled(guest_xml(DB, [40 * MiB]), [0]), 1, 4001)
    result = rig.call(WEB, "prepare", "begin", live(enabled(guest_xml(WEB, [32 * MiB]), [0]), 2))
    assert result.code == 1
    assert result.stderr == ("dmem-libvirt: web01: guest cell 0 needs 32.0 MiB of 2 MiB dmem pages on host node 0; "
                             "24.0 MiB free\n")


def test_prepare_run_twice_for_one_guest_keeps_one_reservation_per_file(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [16 * MiB, 16 * MiB]), [0, 1]), 1)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    assert summary(rig.reservations()) == [(WEB, 0, 16 * MiB, PAGE, "ram-node0", "reserved", "prepare"),
                                           (WEB, 1, 16 * MiB, PAGE, "ram-node1", "reserved", "prepare")]


def test_prepare_refuses_a_guest_defined_for_another_page_size(rig: Rig) -> None:
    xml = define.plan(guest_xml(WEB, [16 * MiB]), page_size=4096, rooms=None, nodes=[0]).rewritten
    result = rig.call(WEB, "prepare", "begin", live(xml, 1))
    assert result == Call(1, "", "dmem-libvirt: web01: defined for 4 KiB pages but host dmemfs uses 2 MiB pages; "
                                 "run 'dmem-libvirt enable web01' again\n")
    assert rig.reservations() == []


# ---- start begin: pinning --------------------------------------------------------------------------


def test_start_pins_every_file_zeroed_at_exact_size_for_the_qemu_user(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [16 * MiB, 8 * MiB]), [0, 0]), 5)
    free = rig.free_pages(0), rig.free_pages(1), rig.total_free_pages()
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml) == Call(0, "", "")
    sizes = {"ram-node0": 16 * MiB, "ram-node1": 8 * MiB}
    assert sorted(p.name for p in directory.iterdir()) == sorted(sizes)
    for name, size in sizes.items():
        info = (directory / name).stat()
        assert (info.st_size, info.st_uid, info.st_gid, info.st_mode & 0o7777) == (size, QEMU_UID, QEMU_GID, 0o600)
        assert scan_for(directory / name, DIRTY_PATTERN) == 0
        assert zero_filled(directory / name)
    pinned = 24 * MiB // PAGE
    assert (rig.free_pages(0), rig.free_pages(1), rig.total_free_pages()) == (free[0] - pinned, free[1],
                                                                               free[2] - pinned)
    entries = {e.file: e for e in rig.reservations()}
    for name in sizes:
        entry = entries[name]
        assert (entry.state, entry.path, entry.inode) == ("pinned", str(directory / name),
                                                          (directory / name).stat().st_ino)


def test_start_finds_the_directory_of_newer_libvirt_without_libvirt_qemu(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 6)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 6, layout="")
    assert rig.call(WEB, "start", "begin", xml).code == 0
    assert (directory / "ram-node0").stat().st_size == 8 * MiB


def test_start_replaces_a_stale_file_nobody_maps(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    stale = directory / "ram-node0"
    stale.write_bytes(DIRTY_PATTERN * 1000)
    old_inode = stale.stat().st_ino
    assert rig.call(WEB, "start", "begin", xml) == Call(0, "", "")
    assert stale.stat().st_ino != old_inode
    assert stale.stat().st_size == 8 * MiB
    assert scan_for(stale, DIRTY_PATTERN) == 0


def test_start_refuses_a_stale_file_that_a_live_process_maps_and_releases(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    stale = directory / "ram-node0"
    stale.write_bytes(b"\0" * 4096)
    rig.qemu(4321, [stale])
    free = rig.free_pages(0)
    result = rig.call(WEB, "start", "begin", xml)
    assert result == Call(1, "", f"dmem-libvirt: web01: {stale} already exists and is mapped by pid 4321\n")
    assert stale.read_bytes() == b"\0" * 4096
    assert rig.reservations() == []
    assert rig.free_pages(0) == free


def test_guest_whose_memory_would_not_land_on_the_dmemfs_mount_is_refused_before_and_at_start(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "host")
    try:
        elsewhere = tmp_path / "ram"
        rig.config = replace(rig.config, libvirt=replace(rig.config.libvirt, memory_backing_dir=elsewhere))
        xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
        result = rig.call(WEB, "prepare", "begin", xml)
        assert result == Call(1, "", f"dmem-libvirt: web01: memory_backing_dir {elsewhere} is not on the tmpfs "
                                     f"(emulated dmemfs) mount {rig.mount}; set memory_backing_dir = "
                                     f"\"{rig.mount}\" in qemu.conf\n")
        assert rig.reservations() == []
        # A start that comes without prepare (hook installed in between) meets the directory itself.
        directory = elsewhere / "libvirt" / "qemu" / "5-web01"
        directory.mkdir(parents=True)
        result = rig.call(WEB, "start", "begin", xml)
        assert result.code == 1
        assert result.stderr == (f"dmem-libvirt: web01: memory directory {directory} is not on the tmpfs (emulated "
                                 f"dmemfs) mount {rig.mount} (filesystem magic 0xef53); set memory_backing_dir = "
                                 f"\"{rig.mount}\" in qemu.conf\n")
        assert list(directory.iterdir()) == []
        assert rig.reservations() == []
    finally:
        rig.close()


def test_start_pins_into_this_run_s_directory_not_one_left_by_an_earlier_run(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    current = rig.domain_dir(WEB, 5, layout="")
    leftover = rig.domain_dir(WEB, 3)
    assert rig.call(WEB, "start", "begin", xml) == Call(0, "", "")
    assert [p.name for p in current.iterdir()] == ["ram-node0"]
    assert list(leftover.iterdir()) == []


def test_failed_start_without_the_memory_directory_releases_the_reservation(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    result = rig.call(WEB, "start", "begin", xml)
    assert result == Call(1, "", f"dmem-libvirt: web01: libvirt's memory directory for this guest is missing under "
                                 f"{rig.mount} (looked for 5-web01 in both layouts)\n")
    assert rig.reservations() == []
    # libvirt runs stopped end and release end after a failed start.
    assert rig.call(WEB, "stopped", "end", xml) == Call(0, "", "")
    assert rig.call(WEB, "release", "end", xml) == Call(0, "", "")
    assert rig.reservations() == []


def test_failed_pin_of_the_second_file_removes_the_first_and_gives_every_page_back(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [16 * MiB, 16 * MiB]), [0, 0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    # The kernel's pool shrank after admission (e.g. a memory error retired pages): 12 pages left.
    (rig.config.dmemfs.debugfs / "node0" / "free_dpages").write_text("12\n")
    result = rig.call(WEB, "start", "begin", xml)
    assert result == Call(1, "", "dmem-libvirt: web01: host node 0 has 8.0 MiB of 2 MiB dmem pages free, "
                                 "pinning needs 16.0 MiB\n")
    assert list(directory.iterdir()) == []
    assert rig.free_pages(0) == 12
    assert rig.reservations() == []
    assert rig.call(WEB, "release", "end", xml) == Call(0, "", "")
    assert rig.free_pages(0) == 12


def test_start_without_prepare_admits_and_pins_in_one_go(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml) == Call(0, "", "")
    assert [(e.file, e.state) for e in rig.reservations()] == [("ram-node0", "pinned")]


def test_start_without_prepare_is_refused_when_the_node_is_full(rig: Rig) -> None:
    start_guest(rig, DB, enabled(guest_xml(DB, [48 * MiB]), [0]), 1, 4001)
    xml = live(enabled(guest_xml(WEB, [32 * MiB]), [0]), 5)
    directory = rig.domain_dir(WEB, 5)
    result = rig.call(WEB, "start", "begin", xml)
    assert result.code == 1
    assert result.stderr.startswith("dmem-libvirt: web01: guest cell 0 needs 32.0 MiB of 2 MiB dmem pages on host "
                                    "node 0; 16.0 MiB free")
    assert list(directory.iterdir()) == []
    assert [e.domain for e in rig.reservations()] == [DB]


# ---- started begin: QEMU maps what was pinned ------------------------------------------------------


def test_started_records_the_qemu_pid_that_maps_every_pinned_file(rig: Rig) -> None:
    xml = enabled(guest_xml(WEB, [8 * MiB, 8 * MiB]), [0, 0])
    start_guest(rig, WEB, xml, 5, 4242)
    assert {(e.file, e.pid) for e in rig.reservations()} == {("ram-node0", 4242), ("ram-node1", 4242)}


def test_started_refuses_a_qemu_that_maps_less_than_was_pinned(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml).code == 0
    rig.running(WEB, xml, 4242)
    rig.qemu(4242, [directory / "ram-node0"], mapped=4 * MiB)
    result = rig.call(WEB, "started", "begin", xml)
    assert result == Call(1, "", f"dmem-libvirt: web01: QEMU (pid 4242) maps 4.0 MiB of {directory / 'ram-node0'}, "
                                 "expected 8.0 MiB\n")


def test_started_refuses_a_file_that_was_replaced_after_pinning(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml).code == 0
    pinned_inode = (directory / "ram-node0").stat().st_ino
    (directory / "ram-node0").unlink()
    (directory / "ram-node0").write_bytes(b"")
    rig.running(WEB, xml, 4242)
    rig.qemu(4242, [directory / "ram-node0"])
    result = rig.call(WEB, "started", "begin", xml)
    assert result.code == 1
    assert result.stderr == (f"dmem-libvirt: web01: {directory / 'ram-node0'} is not the file that was pinned "
                             f"(inode {(directory / 'ram-node0').stat().st_ino}, 0 B; pinned inode {pinned_inode}, "
                             "8.0 MiB)\n")


def test_started_refuses_when_libvirt_wrote_no_pid_file(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml).code == 0
    result = rig.call(WEB, "started", "begin", xml)
    assert result == Call(1, "", f"dmem-libvirt: web01: no QEMU pid file {rig.config.libvirt.run_dir / 'web01.pid'}\n")


def test_started_refuses_a_guest_whose_files_were_never_pinned(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    rig.running(WEB, xml, 4242)
    rig.qemu(4242)
    result = rig.call(WEB, "started", "begin", xml)
    assert result.code == 1
    assert result.stderr.startswith("dmem-libvirt: web01: ram-node0 on host node 0 was never pinned")


def test_started_with_a_corrupt_ledger_rebuilds_it_instead_of_killing_the_guest(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    assert rig.call(WEB, "prepare", "begin", xml).code == 0
    directory = rig.domain_dir(WEB, 5)
    assert rig.call(WEB, "start", "begin", xml).code == 0
    (rig.config.state.dir / "ledger.json").write_text("\0\0\0")
    rig.running(WEB, xml, 4242)
    rig.qemu(4242, [directory / "ram-node0"])
    assert rig.call(WEB, "started", "begin", xml) == Call(0, "", "")
    assert [(e.file, e.state, e.pid) for e in rig.reservations()] == [("ram-node0", "pinned", 4242)]
    assert len(list(rig.config.state.dir.glob("ledger.json.corrupt-*"))) == 1


def test_started_accepts_this_very_process_mapping_the_file_in_the_real_proc(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "host")
    try:
        rig.config = replace(rig.config, host=replace(rig.config.host, proc=Path("/proc")))
        xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
        assert rig.call(WEB, "prepare", "begin", xml).code == 0
        directory = rig.domain_dir(WEB, 5)
        assert rig.call(WEB, "start", "begin", xml).code == 0
        rig.running(WEB, xml, os.getpid())
        fd = os.open(directory / "ram-node0", os.O_RDWR)
        address = numa.map_shared(fd, 8 * MiB)
        try:
            # As QEMU does for memory-backend-file host-nodes=0 policy=bind.
            numa.mbind(address, 8 * MiB, 0)
            assert rig.call(WEB, "started", "begin", xml) == Call(0, "", "")
            assert {e.pid for e in rig.reservations()} == {os.getpid()}
            # Pages a live process maps are not taken away under it.
            assert rig.call(WEB, "release", "end", xml) == Call(0, "", "")
            assert (directory / "ram-node0").exists()
        finally:
            numa.unmap(address, 8 * MiB)
            os.close(fd)
    finally:
        rig.close()


# ---- stopped end / release end: unpin ----------------------------------------------------------------


def test_release_after_libvirt_removed_the_files_drops_reservations_and_gives_pages_back(rig: Rig) -> None:
    free = rig.free_pages(0)
    running, _ = start_guest(rig, WEB, enabled(guest_xml(WEB, [16 * MiB, 8 * MiB]), [0, 0]), 5, 4242)
    assert rig.free_pages(0) == free - 12
    rig.qemu_exits(4242)
    rig.stopped(WEB)
    assert rig.call(WEB, "stopped", "end", running) == Call(0, "", "")
    assert rig.reservations() == []
    assert rig.free_pages(0) == free


def test_release_removes_pinned_files_that_nobody_maps_any_more(rig: Rig) -> None:
    running, directory = start_guest(rig, WEB, enabled(guest_xml(WEB, [8 * MiB]), [0]), 5, 4242)
    rig.qemu_exits(4242)
    assert rig.call(WEB, "release", "end", running) == Call(0, "", "")
    assert list(directory.iterdir()) == []
    assert rig.reservations() == []


def test_second_release_is_a_no_op_that_exits_0(rig: Rig) -> None:
    free = rig.free_pages(0)
    running, _ = start_guest(rig, WEB, enabled(guest_xml(WEB, [8 * MiB]), [0]), 5, 4242)
    rig.qemu_exits(4242)
    rig.stopped(WEB)
    ledger = rig.config.state.dir / "ledger.json"
    assert rig.call(WEB, "stopped", "end", running) == Call(0, "", "")
    after_first = ledger.stat().st_mtime_ns
    assert rig.call(WEB, "release", "end", running, extra="destroyed") == Call(0, "", "")
    assert ledger.stat().st_mtime_ns == after_first
    assert rig.free_pages(0) == free


def release_in_a_fresh_hook(rig: Rig, xml: bytes, operation: str = "release") -> tuple[int, list[str]]:
    """The installed hook's path (its own interpreter, the default config file): exit status and imports."""
    script = ("import sys\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "from dmem_libvirt import config, hook\n"
              f"config.DEFAULT_PATH = config.Path({str(rig.config_path)!r})\n"
              "code = hook.main(['hook', 'web01', sys.argv[1], 'end', '-'], sys.stdin.buffer, sys.stdout, sys.stderr)\n"
              "print(' '.join(sorted(sys.modules)))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-IS", "-c", script, operation], input=xml, capture_output=True,
                          check=False, timeout=60)
    assert done.stderr == b""
    return done.returncode, done.stdout.decode().split()


def test_release_after_the_stop_was_released_parses_nothing_and_leaves_the_ledger_alone(rig: Rig) -> None:
    running, _ = start_guest(rig, WEB, enabled(guest_xml(WEB, [8 * MiB]), [0]), 5, 4242)
    rig.qemu_exits(4242)
    rig.stopped(WEB)
    code, imported = release_in_a_fresh_hook(rig, running, "stopped")
    assert code == 0
    assert "dmem_libvirt.lifecycle" in imported
    assert rig.reservations() == []
    ledger = rig.config.state.dir / "ledger.json"
    after_first = ledger.stat().st_mtime_ns

    code, imported = release_in_a_fresh_hook(rig, running)

    assert code == 0
    assert [m for m in imported
            if m in ("xml.etree.ElementTree", "dmem_libvirt.lifecycle", "dmem_libvirt.ledger")] == []
    assert ledger.stat().st_mtime_ns == after_first


def assert_a_fresh_hook_releases(rig: Rig, name: str, xml: bytes, dom_id: int, pid: int) -> None:
    """Start the guest, stop it, and a release in a hook of its own gives node 0's pages back."""
    free = rig.free_pages(0)
    running, _ = start_guest(rig, name, xml, dom_id, pid)
    rig.qemu_exits(pid)
    rig.stopped(name)

    code, _ = release_in_a_fresh_hook(rig, running)

    assert code == 0
    assert rig.reservations() == []
    assert rig.free_pages(0) == free


def test_release_in_a_fresh_hook_still_frees_what_the_ledger_holds(rig: Rig) -> None:
    assert_a_fresh_hook_releases(rig, WEB, enabled(guest_xml(WEB, [8 * MiB]), [0]), 5, 4242)


def test_release_after_a_refused_prepare_leaves_other_guests_alone(rig: Rig) -> None:
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [48 * MiB]), [0]), 1)).code == 0
    web = live(enabled(guest_xml(WEB, [32 * MiB]), [0]), 2)
    assert rig.call(WEB, "prepare", "begin", web).code == 1
    assert rig.call(WEB, "stopped", "end", web) == Call(0, "", "")
    assert rig.call(WEB, "release", "end", web) == Call(0, "", "")
    assert [e.domain for e in rig.reservations()] == [DB]


# ---- reconnect begin: re-adopt, never fail -------------------------------------------------------------


def running_guest_without_ledger(rig: Rig) -> tuple[bytes, Path]:
    """A guest that runs with pinned files while the ledger knows nothing of it."""
    running, directory = start_guest(rig, WEB, enabled(guest_xml(WEB, [16 * MiB, 8 * MiB]), [0, 0]), 5, 4242)
    return running, directory


def test_reconnect_with_an_empty_ledger_adopts_the_running_guest_from_its_files(rig: Rig) -> None:
    running, directory = running_guest_without_ledger(rig)
    (rig.config.state.dir / "ledger.json").unlink()
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    entries = {e.file: e for e in rig.reservations()}
    assert sorted(entries) == ["ram-node0", "ram-node1"]
    for name, size in (("ram-node0", 16 * MiB), ("ram-node1", 8 * MiB)):
        e = entries[name]
        assert (e.domain, e.node, e.bytes, e.state, e.pid, e.path) == (WEB, 0, size, "pinned", 4242,
                                                                        str(directory / name))


def test_reconnect_replaces_a_ledger_from_another_boot(rig: Rig) -> None:
    running, _ = running_guest_without_ledger(rig)
    ledger = rig.config.state.dir / "ledger.json"
    document = json.loads(ledger.read_text())
    document["boot_id"] = "00000000-0000-4000-8000-000000000000"
    ghost = dict(document["reservations"][0], domain="ghost", uuid="6c1a9d0e-0000-4000-8000-00000000000g")
    document["reservations"].append(ghost)
    ledger.write_text(json.dumps(document))
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    assert json.loads(ledger.read_text())["boot_id"] == rig.context().host.boot_id()
    assert sorted((e.domain, e.file, e.state) for e in rig.reservations()) == [
        (WEB, "ram-node0", "pinned"), (WEB, "ram-node1", "pinned")]


def test_reconnect_frees_old_entries_of_a_dead_domain_but_not_young_ones(rig: Rig) -> None:
    running, _ = running_guest_without_ledger(rig)
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [8 * MiB]), [1]), 7)).code == 0
    rig.now += rig.config.state.orphan_grace - 1
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    assert DB in {e.domain for e in rig.reservations()}
    rig.now += 2
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    assert {e.domain for e in rig.reservations()} == {WEB}


def test_reconnect_keeps_a_corrupt_ledger_aside_and_rebuilds_it(rig: Rig, logged: list[str]) -> None:
    running, _ = running_guest_without_ledger(rig)
    ledger = rig.config.state.dir / "ledger.json"
    ledger.write_text('{"version": 1, "reservations": [')
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    aside = list(rig.config.state.dir.glob("ledger.json.corrupt-*"))
    assert [p.read_text() for p in aside] == ['{"version": 1, "reservations": [']
    assert sorted((e.domain, e.file, e.state, e.pid) for e in rig.reservations()) == [
        (WEB, "ram-node0", "pinned", 4242), (WEB, "ram-node1", "pinned", 4242)]
    assert any("is corrupt" in line and aside[0].name in line and "added 2 reservations" in line
               for line in logged), logged


def test_reconnect_exits_0_when_the_pid_file_is_garbage(rig: Rig) -> None:
    running, _ = running_guest_without_ledger(rig)
    (rig.config.state.dir / "ledger.json").unlink()
    (rig.config.libvirt.run_dir / f"{WEB}.pid").write_text("not a pid\n")
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    assert sorted((e.file, e.state) for e in rig.reservations()) == [("ram-node0", "pinned"), ("ram-node1", "pinned")]


def test_reconnect_completes_a_pin_that_was_never_recorded(rig: Rig) -> None:
    free = rig.free_pages(0)
    running, directory = running_guest_without_ledger(rig)
    ledger = rig.config.state.dir / "ledger.json"
    document = json.loads(ledger.read_text())
    for entry in document["reservations"]:
        entry.update(state="reserved", path=None, inode=None, pid=None)
    ledger.write_text(json.dumps(document))
    assert rig.call(WEB, "reconnect", "begin", running) == Call(0, "", "")
    assert sorted((e.file, e.state, e.path, e.pid) for e in rig.reservations()) == [
        ("ram-node0", "pinned", str(directory / "ram-node0"), 4242),
        ("ram-node1", "pinned", str(directory / "ram-node1"), 4242)]
    rig.qemu_exits(4242)
    rig.stopped(WEB)
    assert rig.call(WEB, "release", "end", running) == Call(0, "", "")
    assert rig.free_pages(0) == free


def test_reconnect_of_a_guest_whose_files_are_gone_still_holds_its_pages(rig: Rig) -> None:
    xml = live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 5)
    rig.running(WEB, xml, 4242)
    rig.qemu(4242)
    assert rig.call(WEB, "reconnect", "begin", xml) == Call(0, "", "")
    assert [(e.file, e.bytes, e.state) for e in rig.reservations()] == [("ram-node0", 8 * MiB, "reserved")]


# ---- migrate begin / restore begin: place on this host -------------------------------------------------


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_incoming_guest_on_the_same_nodes_prints_nothing_books_nothing_and_prepare_books_it(
        rig: Rig, operation: str) -> None:
    xml = enabled(guest_xml(WEB, [16 * MiB, 16 * MiB]), [0, 1])
    assert rig.call(WEB, operation, "begin", xml) == Call(0, "", "")
    # libvirt may still turn the guest away without another hook call: nothing may be left booked.
    assert rig.reservations() == []
    assert rig.call(WEB, "prepare", "begin", live(xml, 9)) == Call(0, "", "")
    assert summary(rig.reservations()) == [(WEB, 0, 16 * MiB, PAGE, "ram-node0", "reserved", "prepare"),
                                           (WEB, 1, 16 * MiB, PAGE, "ram-node1", "reserved", "prepare")]


def test_prepare_of_an_incoming_guest_refuses_when_a_start_took_its_room_after_migrate_begin(rig: Rig) -> None:
    xml = enabled(guest_xml(WEB, [48 * MiB]), [1])
    assert rig.call(WEB, "migrate", "begin", xml) == Call(0, "", "")
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [40 * MiB]), [1]), 1)).code == 0
    result = rig.call(WEB, "prepare", "begin", live(xml, 9))
    assert result.code == 1
    assert result.stderr.startswith("dmem-libvirt: web01: guest cell 0 needs 48.0 MiB of 2 MiB dmem pages on host "
                                    "node 1; ")
    assert {e.domain for e in rig.reservations()} == {DB}


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_incoming_guest_whose_node_is_full_is_moved_and_printed_as_valid_xml(
        rig: Rig, operation: str, tmp_path: Path) -> None:
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [48 * MiB]), [1]), 1)).code == 0
    xml = enabled(guest_xml(WEB, [16 * MiB, 32 * MiB]), [0, 1])
    result = rig.call(WEB, operation, "begin", xml)
    assert (result.code, result.stderr) == (0, "")
    moved = etree.fromstring(result.stdout.encode())
    assert [m.get("nodeset") for m in moved.iterfind("numatune/memnode")] == ["1", "0"]
    ns = {"dmem": "http://dmem-libvirt.org/xmlns/domain/1"}
    assert [c.get("node") for c in moved.iterfind("metadata/dmem:memory/dmem:cell", ns)] == ["1", "0"]
    out = tmp_path / "moved.xml"
    out.write_text(result.stdout)
    validate = subprocess.run(["virt-xml-validate", str(out), "domain"], capture_output=True, text=True, check=False)
    assert validate.returncode == 0, validate.stderr + validate.stdout
    assert rig.call(WEB, "prepare", "begin", live(result.stdout.encode(), 9)) == Call(0, "", "")
    assert summary([e for e in rig.reservations() if e.domain == WEB]) == [
        (WEB, 0, 32 * MiB, PAGE, "ram-node1", "reserved", "prepare"),
        (WEB, 1, 16 * MiB, PAGE, "ram-node0", "reserved", "prepare")]


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_incoming_guest_too_big_for_this_host_is_refused_without_booking(rig: Rig, operation: str) -> None:
    assert rig.call(DB, "prepare", "begin", live(enabled(guest_xml(DB, [48 * MiB]), [1]), 1)).code == 0
    before = summary(rig.reservations())
    xml = enabled(guest_xml(WEB, [40 * MiB, 32 * MiB]), [0, 1])
    result = rig.call(WEB, operation, "begin", xml)
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("dmem-libvirt: web01: guest cells need 40.0 MiB + 32.0 MiB of 2 MiB dmem pages")
    assert "node 1 64.0 MiB free (48.0 MiB reserved by db02)" in result.stderr
    assert summary(rig.reservations()) == before



@pytest.mark.parametrize(("operation", "remedy"), [("migrate", "migrate it to"), ("restore", "restore it on")])
def test_incoming_guest_laid_out_for_another_page_size_is_refused_with_where_it_can_go(
        rig: Rig, operation: str, remedy: str) -> None:
    xml = define.plan(guest_xml(WEB, [16 * MiB]), page_size=4096, rooms=None, nodes=[0]).rewritten
    assert rig.call(WEB, operation, "begin", xml) == Call(
        1, "", f"dmem-libvirt: web01: defined for 4 KiB pages but host dmemfs uses 2 MiB pages; "
               f"{remedy} a host with 4 KiB dmemfs pages\n")
    assert rig.reservations() == []

# ---- orphans --------------------------------------------------------------------------------------------


def test_prepare_frees_old_reservations_of_guests_that_no_longer_run(rig: Rig) -> None:
    free = rig.free_pages(0)
    _, directory = start_guest(rig, DB, enabled(guest_xml(DB, [8 * MiB]), [0]), 1, 4001)
    # QEMU was killed and libvirtd never ran the release hook (e.g. it crashed as well).
    rig.qemu_exits(4001)
    for suffix in (".xml", ".pid"):
        (rig.config.libvirt.run_dir / f"{DB}{suffix}").unlink()
    web = live(enabled(guest_xml(WEB, [8 * MiB]), [1]), 2)
    assert rig.call(WEB, "prepare", "begin", web).code == 0
    assert {e.domain for e in rig.reservations()} == {DB, WEB}
    assert (directory / "ram-node0").exists()
    rig.now += rig.config.state.orphan_grace + 1
    assert rig.call(WEB, "prepare", "begin", web).code == 0
    assert {e.domain for e in rig.reservations()} == {WEB}
    assert not directory.exists()
    assert rig.free_pages(0) == free


def test_prepare_keeps_old_reservations_of_a_guest_whose_qemu_still_runs(rig: Rig) -> None:
    start_guest(rig, DB, enabled(guest_xml(DB, [8 * MiB]), [0]), 1, 4001)
    for suffix in (".xml", ".pid"):
        (rig.config.libvirt.run_dir / f"{DB}{suffix}").unlink()
    rig.now += rig.config.state.orphan_grace + 1
    assert rig.call(WEB, "prepare", "begin", live(enabled(guest_xml(WEB, [8 * MiB]), [1]), 2)).code == 0
    assert {e.domain for e in rig.reservations()} == {DB, WEB}


def test_prepare_removes_old_memory_directories_of_guests_that_no_longer_run(rig: Rig) -> None:
    old = rig.domain_dir("gone", 3)
    (old / "ram-node0").write_bytes(b"x" * 4096)
    young = rig.domain_dir("starting", 4)
    alive = rig.domain_dir(DB, 1)
    rig.running(DB, live(enabled(guest_xml(DB, [8 * MiB]), [0]), 1), 4001)
    rig.qemu(4001)
    stamp = rig.now - rig.config.state.orphan_grace - 1
    for directory in (old, alive):
        os.utime(directory, (stamp, stamp))
    assert rig.call(WEB, "prepare", "begin", live(enabled(guest_xml(WEB, [8 * MiB]), [0]), 2)).code == 0
    assert (old.exists(), young.exists(), alive.exists()) == (False, True, True)


def test_ledger_written_by_the_hook_reads_back_in_a_fresh_process_view(rig: Rig) -> None:
    start_guest(rig, WEB, enabled(guest_xml(WEB, [8 * MiB]), [0]), 5, 4242)
    fresh = Ledger(rig.config.state.dir, rig.context().host.boot_id(), lock_timeout=1)
    assert [(e.file, e.state, e.pid) for e in fresh.read()] == [("ram-node0", "pinned", 4242)]

