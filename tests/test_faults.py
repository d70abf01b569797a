"""Faults users hit in combination: hand-edited definitions, damaged state, recycled pids, odd names, a broken
installation.  Each test drives the hook or the command as libvirt and an operator would, on a fake host
(tests/test_hook.py's Rig), and asserts what the user would notice.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fakehost import write_sysfs
from test_hook import Call, Rig, enabled, guest_xml, live, start_guest

from dmem_libvirt import cli, hook, install, status
from dmem_libvirt.cpulist import parse_cpulist
from dmem_libvirt.domain import parse_cpuset, read_domain
from dmem_libvirt.errors import DmemError
from dmem_libvirt.ledger import Reservation
from dmem_libvirt.pin import remove_file
from dmem_libvirt.units import MiB

HOUR = 3600.0


def command(rig: Rig, *argv: str, stdin: bytes = b"") -> Call:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(rig.config_path), *argv], stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    return Call(code, out.getvalue(), err.getvalue())


def one_line(call: Call) -> str:
    assert call.code == 1, call
    assert call.stderr.count("\n") == 1 and call.stderr.startswith("dmem-libvirt: "), call
    return call.stderr


def ledger_path(rig: Rig) -> Path:
    return rig.config.state.dir / "ledger.json"


def bad_entry(name: str = "evil") -> dict[str, object]:
    return {"domain": name, "uuid": "00000000-0000-4000-8000-0000000000ee", "node": 0, "bytes": 2 * MiB,
            "page_size": 2 * MiB, "backend": "dmemfs", "file": "..", "state": "reserved", "origin": "prepare",
            "created": 0.0}


# ---- one validator for a backing file name ---------------------------------------------------------


def test_hand_edited_backing_file_name_is_refused_at_prepare_and_other_reservations_survive(rig: Rig) -> None:
    other = live(enabled(guest_xml("db01", [32 * MiB]), [0]), 1)
    assert rig.call("db01", "prepare", "begin", other).code == 0
    edited = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 2).replace(b'file="ram-node0"', b'file=".."')
    assert b'file=".."' in edited
    line = one_line(rig.call("web01", "prepare", "begin", edited))
    assert line.startswith("dmem-libvirt: web01: dmem metadata cell 0 has a bad file= '..'")
    assert [e.domain for e in rig.reservations()] == ["db01"]
    # The next transaction finds a ledger it can read: db01's in-flight reservation still counts.
    third = live(enabled(guest_xml("app01", [48 * MiB]), [0]), 3)
    assert rig.call("app01", "prepare", "begin", third).code == 1
    assert [e.domain for e in rig.reservations()] == ["db01"]


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\0b", "x" * 256, "ram-node0", "pc.ram", "memdimm3"])
def test_metadata_ledger_and_pin_agree_on_what_a_backing_file_name_is(rig: Rig, name: str) -> None:
    xml = enabled(guest_xml("web01", [16 * MiB]), [0]).replace(b'file="ram-node0"',
                                                                 f'file="{name.replace(chr(0), "&#0;")}"'.encode())
    try:
        from xml.etree import ElementTree as ET

        read_domain(ET.fromstring(xml))
        metadata_ok = True
    except (DmemError, ET.ParseError):
        metadata_ok = False
    entry = {**bad_entry(), "file": name}
    try:
        Reservation.from_json(entry)
        ledger_ok = True
    except DmemError:
        ledger_ok = False
    try:
        remove_file(rig.mount, name)
        pin_ok = True
    except DmemError:
        pin_ok = False
    assert metadata_ok == ledger_ok == pin_ok
    assert pin_ok == (name in ("ram-node0", "pc.ram", "memdimm3"))


# ---- a damaged ledger ------------------------------------------------------------------------------


def test_a_bad_ledger_entry_costs_only_itself_and_in_flight_reservations_still_count(rig: Rig) -> None:
    inflight = live(enabled(guest_xml("db01", [48 * MiB]), [0]), 1)
    assert rig.call("db01", "prepare", "begin", inflight).code == 0
    document = json.loads(ledger_path(rig).read_text())
    document["reservations"].append(bad_entry())
    ledger_path(rig).write_text(json.dumps(document))
    # 48 of 64 MiB of node 0 are booked by a guest that is starting, not running: 32 more must not fit.
    late = live(enabled(guest_xml("web01", [32 * MiB]), [0]), 2)
    assert rig.call("web01", "prepare", "begin", late).code == 1
    elsewhere = live(enabled(guest_xml("app01", [32 * MiB]), [1]), 3)
    assert rig.call("app01", "prepare", "begin", elsewhere).code == 0
    assert [e.domain for e in rig.reservations()] == ["db01", "app01"]
    assert len(list(rig.config.state.dir.glob("ledger.json.corrupt-*"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage-tail"])
def test_a_truncated_ledger_keeps_every_entry_still_readable(rig: Rig, damage: str) -> None:
    for index, name in enumerate(["db01", "db02"]):
        xml = live(enabled(guest_xml(name, [16 * MiB]), [index]), index + 1)
        assert rig.call(name, "prepare", "begin", xml).code == 0
    text = ledger_path(rig).read_text()
    cut = text.rindex("}", 0, text.rindex("}") - 1) - 3
    ledger_path(rig).write_text(text[:cut] if damage == "truncated" else text[:cut] + "\0\0garbage")
    # The second entry lost its tail; the first must survive any transaction.
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [1]), 9)
    assert rig.call("web01", "prepare", "begin", xml).code == 0
    assert sorted(e.domain for e in rig.reservations()) == ["db01", "web01"]


def test_status_answers_over_a_damaged_ledger_and_says_so(rig: Rig) -> None:
    xml = live(enabled(guest_xml("db01", [16 * MiB]), [0]), 1)
    assert rig.call("db01", "prepare", "begin", xml).code == 0
    document = json.loads(ledger_path(rig).read_text())
    document["reservations"].append(bad_entry())
    ledger_path(rig).write_text(json.dumps(document))
    table = command(rig, "status")
    assert table.code == 0, table
    assert "db01" in table.stdout
    assert "ledger" in table.stderr and "damaged" in table.stderr and "reservation 1" in table.stderr
    as_json = command(rig, "status", "--json")
    assert as_json.code == 0
    data = json.loads(as_json.stdout)
    assert [r["domain"] for r in data["reservations"]] == ["db01"]
    assert "reservation 1" in data["ledger_damage"]
    ledger_path(rig).write_text("{not json")
    assert command(rig, "status").code == 0


# ---- libvirt's names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q'u", 'say "hi"', "a&b", "<x>"])
def test_guest_named_with_xml_special_characters_starts(rig: Rig, name: str) -> None:
    xml = enabled(guest_xml(name, [16 * MiB]).replace(f"<name>{name}</name>", f"<name>{_escape(name)}</name>"), [0])
    start_guest(rig, name, xml, 5, 4242)
    assert [e.pid for e in rig.reservations()] == [4242]


def _escape(name: str) -> str:
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# ---- a broken installation ---------------------------------------------------------------------------


def broken_hook(tmp_path: Path) -> Path:
    """The hook as install-hook writes it, whose library path was removed (an upgrade, a deleted venv)."""
    script = tmp_path / "50-dmem-libvirt"
    script.write_text(install.render_hook(install.hook_template(), sys.executable, [str(tmp_path / "gone")]))
    script.chmod(0o755)
    return script


def run_script(script: Path, name: str, operation: str, subop: str, xml: bytes) -> Call:
    done = subprocess.run([str(script), name, operation, subop, "-"], input=xml, capture_output=True,
                          check=False, timeout=60, cwd="/", env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    return Call(done.returncode, done.stdout.decode(), done.stderr.decode())


def test_unrelated_guests_start_when_the_package_cannot_be_imported(tmp_path: Path) -> None:
    script = broken_hook(tmp_path)
    xml = live(guest_xml("plain01", memory=64 * MiB).encode(), 3)
    for operation, subop in [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("release", "end")]:
        assert run_script(script, "plain01", operation, subop, xml) == Call(0, "", "")


def test_our_guest_gets_one_line_naming_the_broken_installation(tmp_path: Path) -> None:
    script = broken_hook(tmp_path)
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    prepare = run_script(script, "web01", "prepare", "begin", xml)
    line = one_line(prepare)
    assert line.startswith("dmem-libvirt: web01: the dmem-libvirt package cannot be imported")
    assert str(tmp_path / "gone") in line
    assert run_script(script, "web01", "release", "end", xml) == Call(0, "", "")
    assert run_script(script, "web01", "reconnect", "begin", xml).code == 0


# ---- hostile definitions -------------------------------------------------------------------------------


def test_rewrite_of_two_guest_cells_with_one_id_is_one_line(rig: Rig) -> None:
    xml = guest_xml("web01", [16 * MiB, 16 * MiB]).replace('<cell id="1"', '<cell id="0"')
    line = one_line(command(rig, "rewrite", "--nodes", "0", stdin=xml.encode()))
    assert line.startswith("dmem-libvirt: web01: guest cell 0 is defined twice")


def test_rewrite_of_guest_cells_not_numbered_from_0_is_one_line(rig: Rig) -> None:
    xml = guest_xml("web01", [16 * MiB, 16 * MiB]).replace('<cell id="1"', '<cell id="2"')
    line = one_line(command(rig, "rewrite", "--nodes", "0", stdin=xml.encode()))
    assert "guest cell 2" in line


def test_hook_refuses_our_guest_with_entity_declarations_without_expanding_them(rig: Rig) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    bomb = (b'<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
            + xml.replace(b"<name>web01</name>", b"<name>web01&b;</name>"))
    line = one_line(rig.call("web01", "prepare", "begin", bomb))
    assert "DOCTYPE" in line
    assert rig.reservations() == []


def test_hook_reads_a_bounded_amount_of_stdin(rig: Rig) -> None:
    from dmem_libvirt.xmlsafe import MAX_XML_BYTES

    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    huge = xml.replace(b"</domain>", b"<!--" + b"x" * MAX_XML_BYTES + b"--></domain>")
    stream = io.BytesIO(huge)
    out, err = io.StringIO(), io.StringIO()
    code = hook.main(["dmem-libvirt-hook", "web01", "prepare", "begin", "-"], stream, out, err,
                     context=rig.context())
    assert code == 1 and "refusing more than" in err.getvalue()
    assert stream.tell() <= MAX_XML_BYTES + 1
    assert rig.reservations() == []


# ---- the state directory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_state_dir_writable_by_others_is_refused_and_named_by_check(rig: Rig, mode: int) -> None:
    state = rig.config.state.dir
    state.chmod(mode)
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    line = one_line(rig.call("web01", "prepare", "begin", xml))
    assert str(state) in line and "writable" in line
    assert not ledger_path(rig).exists()
    assert rig.call("web01", "release", "end", xml) == Call(0, "", "")
    checked = command(rig, "check")
    assert f"FAIL  state directory {state}" in checked.stdout


def test_state_dir_owned_by_another_user_is_refused(rig: Rig) -> None:
    state = rig.config.state.dir
    os.chown(state, 64055, 64055)
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    line = one_line(rig.call("web01", "prepare", "begin", xml))
    assert str(state) in line and "owned by uid 64055" in line


@pytest.mark.parametrize("victim", ["ledger.json", "lock"])
def test_state_files_replaced_by_symlinks_are_never_followed(rig: Rig, tmp_path: Path, victim: str) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    (rig.config.state.dir / victim).symlink_to(target)
    result = rig.call("web01", "prepare", "begin", xml)
    assert result.code == 1, result
    assert target.read_text() == "precious\n"


# ---- liveness, binding and release -----------------------------------------------------------------------


def test_orphan_whose_pid_was_recycled_by_another_process_is_freed(rig: Rig) -> None:
    xml = enabled(guest_xml("db01", [32 * MiB]), [0])
    start_guest(rig, "db01", xml, 1, 4242)
    free_running = rig.free_pages(0)
    # QEMU dies with libvirtd down: no release ever comes.  Later another program gets pid 4242.
    rig.stopped("db01")
    rig.qemu_exits(4242)
    rig.qemu(4242, [], start_ticks=987654)
    rig.now += 2 * HOUR
    other = live(enabled(guest_xml("web01", [16 * MiB]), [1]), 2)
    assert rig.call("web01", "prepare", "begin", other).code == 0
    assert [e.domain for e in rig.reservations()] == ["web01"]
    assert rig.free_pages(0) == free_running + 16


def test_started_refuses_a_mapping_not_bound_to_the_recorded_node(rig: Rig) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 1)
    assert rig.call("web01", "prepare", "begin", xml).code == 0
    directory = rig.domain_dir("web01", 1)
    assert rig.call("web01", "start", "begin", xml).code == 0
    rig.running("web01", xml, 4242)
    rig.qemu(4242, sorted(directory.iterdir()), policy="default")
    line = one_line(rig.call("web01", "started", "begin", xml))
    assert "not bound to host node 0" in line and "default" in line
    rig.qemu(4242, sorted(directory.iterdir()), policy="bind:1")
    assert "bind:1" in one_line(rig.call("web01", "started", "begin", xml))
    rig.qemu(4242, sorted(directory.iterdir()))
    assert rig.call("web01", "started", "begin", xml) == Call(0, "", "")


def test_file_still_mapped_at_release_stays_booked_until_it_is_gone(rig: Rig) -> None:
    full = rig.free_pages(0)
    xml = enabled(guest_xml("db01", [16 * MiB]), [0])
    running, directory = start_guest(rig, "db01", xml, 1, 4242)
    # libvirt lost track of QEMU, which still maps the file; the release comes anyway.
    for suffix in (".xml", ".pid"):
        (rig.config.libvirt.run_dir / f"db01{suffix}").unlink()
    assert rig.call("db01", "release", "end", running) == Call(0, "", "")
    assert [e.domain for e in rig.reservations()] == ["db01"]
    assert rig.free_pages(0) == full - 8
    rig.qemu_exits(4242)
    rig.now += 2 * HOUR
    assert any(line.startswith("freed db01") for line in status.reconcile(rig.context()))
    assert rig.reservations() == []
    assert not (directory / "ram-node0").exists()
    assert rig.free_pages(0) == full


# ---- host reading and CPU lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "cpus"), [("0-3,^2,2", {0, 1, 2, 3}), ("0-3,^2", {0, 1, 3}),
                                            ("^3,0-4", {0, 1, 2, 3, 4}), (" 1 , 3", {1, 3})])
def test_one_cpu_list_syntax_for_host_and_domain(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == parse_cpuset(text, "<vcpu cpuset>") == frozenset(cpus)


@pytest.mark.parametrize("text", ["^2-3", "0-5,^2-3", "3-1", "1,,2"])
def test_cpu_lists_libvirt_refuses_are_refused_by_both(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)
    with pytest.raises(DmemError):
        parse_cpuset(text, "<vcpu cpuset>")


@pytest.mark.parametrize(("name", "text"), [("distance", "10 twenty\n"), ("meminfo", "Node 0 MemTotal: 1 MB\n")])
def test_odd_sysfs_values_admission_does_not_use_refuse_no_guest(rig: Rig, name: str, text: str) -> None:
    write_sysfs(rig.config, f"node0/{name}", text)
    xml = enabled(guest_xml("web01", [16 * MiB]), [0])
    start_guest(rig, "web01", xml, 1, 4242)



# ---- what check learned -----------------------------------------------------------------------------------


def test_check_runs_the_installed_hook_and_names_a_broken_installation(rig: Rig) -> None:
    install.install_hook(rig.config.libvirt.hooks_dir)
    working = command(rig, "check").stdout
    assert f"ok    hook {install.hook_path(rig.config.libvirt.hooks_dir)} loads the package" in working
    hook_file = install.hook_path(rig.config.libvirt.hooks_dir)
    hook_file.write_text(install.render_hook(install.hook_template(), sys.executable, ["/nonexistent/venv"]))
    broken = command(rig, "check")
    assert broken.code == 1
    assert f"FAIL  the hook {hook_file} fails as libvirt runs it (exit 1)" in broken.stdout
    assert "cannot be imported from /nonexistent/venv" in broken.stdout


def test_check_names_a_ledger_that_was_set_aside(rig: Rig) -> None:
    xml = live(enabled(guest_xml("db01", [16 * MiB]), [0]), 1)
    assert rig.call("db01", "prepare", "begin", xml).code == 0
    ledger_path(rig).write_text("{garbage")
    assert "FAIL  ledger" in command(rig, "check").stdout
    other = live(enabled(guest_xml("web01", [16 * MiB]), [1]), 2)
    assert rig.call("web01", "prepare", "begin", other).code == 0
    checked = command(rig, "check").stdout
    assert "damaged ledger(s) were set aside" in checked


def test_a_deleted_ledger_is_rebuilt_from_the_running_guests(rig: Rig) -> None:
    start_guest(rig, "db01", enabled(guest_xml("db01", [32 * MiB]), [0]), 1, 4242)
    ledger_path(rig).unlink()
    # The next transaction books the running guest again: its release will give its pages back.
    small = live(enabled(guest_xml("app01", [16 * MiB]), [1]), 3)
    assert rig.call("app01", "prepare", "begin", small).code == 0
    assert [(e.domain, e.state) for e in rig.reservations()] == [("db01", "pinned"), ("app01", "reserved")]
    full = rig.free_pages(0) + 16
    rig.stopped("db01")
    rig.qemu_exits(4242)
    assert rig.call("db01", "release", "end", live(enabled(guest_xml("db01", [32 * MiB]), [0]), 1)).code == 0
    assert rig.free_pages(0) == full


def test_the_hook_script_filters_with_the_package_s_own_limit_markers_and_operations() -> None:
    from dmem_libvirt import XMLNS
    from dmem_libvirt.hook import NEVER_FAIL, OPERATIONS
    from dmem_libvirt.xmlsafe import MAX_XML_BYTES

    namespace: dict[str, object] = {}
    text = install.hook_template()
    exec(text[: text.index("\ndef main")], namespace)  # the script's constants, without running it
    assert namespace["READ_LIMIT"] == MAX_XML_BYTES + 1
    assert namespace["OUR_NAMESPACE"] == XMLNS.encode()
    refusing = {operation for (operation, subop), handler in OPERATIONS.items()
                if subop == "begin" and handler not in NEVER_FAIL}
    assert set(namespace["MAY_REFUSE"]) == refusing  # type: ignore[arg-type]
    # The sh half that runs first filters with the same limit and markers.
    sh = dict(line.split("=", 1) for line in text[: text.index("\n'''\n")].splitlines()
              if line[:1].isupper() and "=" in line)
    assert int(sh["READ_LIMIT"]) == MAX_XML_BYTES + 1
    assert shlex.split(sh["OUR_NAMESPACE"]) == [XMLNS]
    assert shlex.split(sh["FILE_BACKED"]) == [namespace["FILE_BACKED"].decode()]  # type: ignore[attr-defined]
    assert shlex.split(sh["MAY_REFUSE"])[0].split() == list(namespace["MAY_REFUSE"])  # type: ignore[call-overload]


def test_orphans_freed_by_a_refused_prepare_stay_freed_in_the_ledger(rig: Rig) -> None:
    full = rig.free_pages(0)
    start_guest(rig, "db01", enabled(guest_xml("db01", [16 * MiB]), [0]), 1, 4242)
    # db01's QEMU died while libvirtd was down: its files and pages are an orphan.
    rig.qemu_exits(4242)
    rig.stopped("db01")
    rig.now += 2 * HOUR
    too_big = live(enabled(guest_xml("web01", [80 * MiB]), [0]), 2)
    assert rig.call("web01", "prepare", "begin", too_big).code == 1
    # The orphan's pages went back with the refused prepare: the ledger must not book them any more.
    assert rig.free_pages(0) == full
    assert rig.reservations() == []
