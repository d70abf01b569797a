"""Guests that OpenStack Nova defines, through the hook: refused by default, admitted with ``[adopt]``.

The domains are tests/data/nova/*.xml, shaped as Nova's libvirt driver writes them (file-backed memory
with <discard/>, <numatune> memnodes when the flavor has a NUMA topology, hugepages for hw:mem_page_size,
the <nova:instance> metadata).  They run on the Rig of tests/test_hook.py: emulated dmemfs on a real tmpfs,
whose pinned files are really bound to host node 0, so guests that start are kept on node 0.
"""

from __future__ import annotations

import subprocess
import sys
import syslog
from dataclasses import replace
from pathlib import Path

import pytest
from fakehuge import context as fakehuge_context
from fakehuge import make_huge_host, pool, use
from lxml import etree
from test_backend_hugetlbfs import call as huge_call
from test_backend_hugetlbfs import qemu as qemu_maps
from test_backend_hugetlbfs import ram
from test_hook import PAGE, REPO, Call, Rig, live, start_guest
from test_lifecycle import assert_a_fresh_hook_releases, release_in_a_fresh_hook, summary, zero_filled

from dmem_libvirt import config, status
from dmem_libvirt.backends.emulated import DIRTY_PATTERN
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.pin import scan_for
from dmem_libvirt.units import MiB

NOVA_DATA = Path(__file__).parent / "data" / "nova"
FLAT = "instance-0000000a"       # no NUMA topology
NUMA = "instance-0000000b"       # hw:numa_nodes=1: memnode cell 0 -> host node 0
NUMA2 = "instance-0000000c"      # hw:numa_nodes=2: cells 0, 1 -> host nodes 0, 1
HUGE = "instance-0000000d"       # hw:mem_page_size=2MB
FILES = {FLAT: "instance-flat.xml", NUMA: "instance-numa.xml", NUMA2: "instance-numa2.xml",
         HUGE: "instance-hugepages.xml"}


def nova_xml(name: str, **changes: str) -> bytes:
    """Nova's domain XML for ``name``; ``changes`` replace attribute values by XPath-like keys below."""
    data = (NOVA_DATA / FILES[name]).read_bytes()
    for old, new in changes.items():
        data = data.replace(old.encode(), new.encode())
    return data


def with_memnodes(name: str, nodes: dict[int, int]) -> bytes:
    """Nova's XML with the guest cells' <memnode nodeset> set to ``nodes`` (cell -> host node)."""
    root = etree.fromstring(nova_xml(name))
    for memnode in root.iterfind("numatune/memnode"):
        memnode.set("nodeset", str(nodes[int(memnode.get("cellid"))]))
    root.find("numatune/memory").set("nodeset", ",".join(str(n) for n in sorted(set(nodes.values()))))
    return etree.tostring(root)


def uuid_of(xml: bytes) -> str:
    return str(etree.fromstring(xml).findtext("uuid"))


@pytest.fixture
def admitting(rig: Rig) -> Rig:
    """The rig with ``[adopt] file_backed = "admit"``, 256 MiB of 2 MiB pages on each of two nodes."""
    rig.config = replace(rig.config, adopt=config.AdoptConfig(file_backed="admit"))
    for node in (0, 1):
        set_pool(rig, node, 256 * MiB)
    return rig


def set_pool(rig: Rig, node: int, size: int) -> None:
    """Resize node ``node``'s emulated pool (all free), keeping the host totals consistent."""
    debugfs = rig.config.dmemfs.debugfs
    old = int((debugfs / f"node{node}" / "total_dpages").read_text())
    for name in ("total_dpages", "free_dpages"):
        (debugfs / f"node{node}" / name).write_text(f"{size // PAGE}\n")
        total = int((debugfs / name).read_text())
        (debugfs / name).write_text(f"{total - old + size // PAGE}\n")


def stop(rig: Rig, name: str, running: bytes, pid: int) -> None:
    """QEMU exits; libvirt removes its files, then runs stopped end and release end."""
    rig.qemu_exits(pid)
    rig.stopped(name)
    assert rig.call(name, "stopped", "end", running) == Call(0, "", "")
    assert rig.call(name, "release", "end", running) == Call(0, "", "")


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(syslog, "syslog", lambda *args: lines.append(str(args[-1])))
    return lines


# ---- refused by default --------------------------------------------------------------------------------


def test_nova_guest_is_refused_by_default_as_any_file_backed_guest_without_metadata(rig: Rig) -> None:
    result = rig.call(FLAT, "prepare", "begin", live(nova_xml(FLAT), 1))
    assert result == Call(1, "", f"dmem-libvirt: {FLAT}: memory_backing_dir is on dmemfs; "
                                 f"run 'dmem-libvirt enable {FLAT}' or use memfd\n")
    assert rig.reservations() == []


@pytest.mark.parametrize("key, today", [("file_backed", "refuse"), ("hugepages", "ignore")])
def test_adopt_settings_default_to_today_s_behaviour_and_accept_admit(tmp_path: Path, key: str, today: str) -> None:
    assert getattr(config.parse({}).adopt, key) == today
    assert getattr(config.parse({"adopt": {key: "admit"}}).adopt, key) == "admit"
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"adopt": {key: "yes"}}, source=tmp_path / "c.toml")
    assert caught.value.line() == (f"dmem-libvirt: bad value for [adopt] {key} in {tmp_path / 'c.toml'}: "
                                   f"expected one of '{today}', 'admit', got 'yes'")


# ---- admitted: placement -------------------------------------------------------------------------------


def test_guest_without_numa_topology_is_reserved_whole_on_the_best_fitting_node(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 192 * MiB)
    assert rig.call(FLAT, "prepare", "begin", live(nova_xml(FLAT), 1)) == Call(0, "", "")
    entries = rig.reservations()
    assert summary(entries) == [(FLAT, 1, 128 * MiB, PAGE, "pc.ram", "reserved", "prepare")]
    assert entries[0].uuid == uuid_of(nova_xml(FLAT))


@pytest.mark.parametrize("nodes", [{0: 0, 1: 1}, {0: 1, 1: 0}], ids=["cells-0-1", "cells-1-0"])
def test_guest_cells_go_exactly_where_its_memnodes_say(admitting: Rig, nodes: dict[int, int]) -> None:
    rig = admitting
    # Best fit alone would put both 64 MiB cells on the tighter node 1.
    set_pool(rig, 1, 160 * MiB)
    assert rig.call(NUMA2, "prepare", "begin", live(with_memnodes(NUMA2, nodes), 1)) == Call(0, "", "")
    assert sorted((e.file, e.node, e.bytes) for e in rig.reservations()) == [
        ("ram-node0", nodes[0], 64 * MiB), ("ram-node1", nodes[1], 64 * MiB)]


def test_memory_nodeset_alone_confines_every_cell_to_its_nodes(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 0, 160 * MiB)
    root = etree.fromstring(nova_xml(NUMA))
    tune = root.find("numatune")
    tune.remove(tune.find("memnode"))
    tune.find("memory").set("nodeset", "1")
    assert rig.call(NUMA, "prepare", "begin", live(etree.tostring(root), 1)) == Call(0, "", "")
    assert [(e.file, e.node) for e in rig.reservations()] == [("ram-node0", 1)]


def test_memnode_on_a_full_node_is_refused_with_the_numbers_though_another_node_has_room(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 32 * MiB)
    result = rig.call(NUMA2, "prepare", "begin", live(nova_xml(NUMA2), 1))
    assert result == Call(1, "", f"dmem-libvirt: {NUMA2}: guest cell 1 needs 64.0 MiB of 2 MiB dmem pages "
                                 "on host node 1; 32.0 MiB free\n")
    assert rig.reservations() == []


def test_guest_beyond_the_pool_is_refused_at_prepare_and_holds_nothing(admitting: Rig) -> None:
    rig = admitting
    big = nova_xml(FLAT, **{"<memory>131072</memory>": "<memory>524288</memory>"})
    result = rig.call(FLAT, "prepare", "begin", live(big, 1))
    assert result == Call(1, "", f"dmem-libvirt: {FLAT}: guest needs 512.0 MiB of 2 MiB dmem pages on one host "
                                 "node; node 0: 256.0 MiB free; node 1: 256.0 MiB free\n")
    assert rig.reservations() == []
    assert rig.call(FLAT, "release", "end", live(big, 1)) == Call(0, "", "")


def test_flavor_that_is_not_a_whole_number_of_pages_is_refused_with_the_sizes_that_fit(admitting: Rig) -> None:
    odd = nova_xml(FLAT, **{"<memory>131072</memory>": "<memory>132096</memory>"})
    result = admitting.call(FLAT, "prepare", "begin", live(odd, 1))
    assert result == Call(1, "", f"dmem-libvirt: {FLAT}: <memory> is 129 MiB, not a multiple of 2 MiB pages; "
                                 "give the guest (its flavor) 128 MiB or 130 MiB\n")


def test_discard_is_warned_about_at_admission_only_and_never_refused(admitting: Rig, logged: list[str]) -> None:
    start_guest(admitting, NUMA, nova_xml(NUMA), 3, 4300)
    warnings = [line for line in logged if "<discard/>" in line]
    assert len(warnings) == 1, logged
    assert "frees nothing on dmemfs" in warnings[0] and NUMA in warnings[0]


# ---- admitted: pinning, release, hard reboot -------------------------------------------------------------


@pytest.mark.parametrize("name, file", [(FLAT, "pc.ram"), (NUMA, "ram-node0")])
def test_admitted_guest_is_pinned_zeroed_verified_and_given_back(admitting: Rig, name: str, file: str) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    free = rig.free_pages(0)
    running, directory = start_guest(rig, name, nova_xml(name), 7, 4400)
    pinned = directory / file
    assert pinned.stat().st_size == 128 * MiB
    assert scan_for(pinned, DIRTY_PATTERN) == 0 and zero_filled(pinned)
    assert [(e.file, e.node, e.state, e.pid, e.path) for e in rig.reservations()] == [
        (file, 0, "pinned", 4400, str(pinned))]
    assert rig.free_pages(0) == free - 128 * MiB // PAGE
    stop(rig, name, running, 4400)
    assert rig.reservations() == []
    assert rig.free_pages(0) == free


def test_second_release_of_an_admitted_guest_finds_it_released_without_the_lifecycle(admitting: Rig) -> None:
    rig = admitting
    rig.config_path.write_text(rig.config_path.read_text() + '\n[adopt]\nfile_backed = "admit"\n')
    free = rig.free_pages(0)
    running, _ = start_guest(rig, NUMA, nova_xml(NUMA), 7, 4400)
    rig.qemu_exits(4400)
    rig.stopped(NUMA)
    assert rig.call(NUMA, "stopped", "end", running) == Call(0, "", "")
    assert rig.reservations() == [] and rig.free_pages(0) == free
    ledger = rig.config.state.dir / "ledger.json"
    after_stopped = ledger.stat().st_mtime_ns

    code, imported = release_in_a_fresh_hook(rig, running)

    assert code == 0
    assert [m for m in imported if m in ("dmem_libvirt.lifecycle", "dmem_libvirt.ledger")] == []
    assert ledger.stat().st_mtime_ns == after_stopped
    assert rig.free_pages(0) == free


@pytest.mark.parametrize("name", [FLAT, NUMA])
def test_release_in_a_fresh_hook_gives_an_admitted_guest_s_pages_back(admitting: Rig, name: str) -> None:
    rig = admitting
    rig.config_path.write_text(rig.config_path.read_text() + '\n[adopt]\nfile_backed = "admit"\n')
    set_pool(rig, 1, 0)
    assert_a_fresh_hook_releases(rig, name, nova_xml(name), 7, 4400)


def test_hard_reboot_undefine_define_start_keeps_one_reservation_and_leaks_nothing(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    free = rig.free_pages(0)
    xml = nova_xml(NUMA)
    running, _ = start_guest(rig, NUMA, xml, 7, 4400)
    # Nova's hard reboot: destroy (stopped, release), undefine, define the same XML, start with a new id.
    stop(rig, NUMA, running, 4400)
    running, directory = start_guest(rig, NUMA, xml, 8, 4401)
    entries = rig.reservations()
    assert [(e.uuid, e.file, e.state, e.pid) for e in entries] == [(uuid_of(xml), "ram-node0", "pinned", 4401)]
    assert rig.free_pages(0) == free - 128 * MiB // PAGE
    stop(rig, NUMA, running, 4401)
    assert rig.reservations() == [] and rig.free_pages(0) == free
    assert not directory.exists()


def test_start_after_a_lost_release_replaces_the_stale_reservation(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    free = rig.free_pages(0)
    start_guest(rig, NUMA, nova_xml(NUMA), 7, 4400)
    # The host lost the release (libvirtd died with the guest): the next start must not double-book.
    rig.qemu_exits(4400)
    rig.stopped(NUMA)
    start_guest(rig, NUMA, nova_xml(NUMA), 9, 4402)
    assert [(e.file, e.pid) for e in rig.reservations()] == [("ram-node0", 4402)]
    assert rig.free_pages(0) == free - 128 * MiB // PAGE


def test_start_without_prepare_admits_on_the_node_it_chooses(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    running = live(nova_xml(FLAT), 4)
    directory = rig.domain_dir(FLAT, 4)
    assert rig.call(FLAT, "start", "begin", running) == Call(0, "", "")
    assert [(e.file, e.node, e.state, e.origin) for e in rig.reservations()] == [("pc.ram", 0, "pinned", "start")]
    assert (directory / "pc.ram").stat().st_size == 128 * MiB


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_incoming_nova_guest_is_left_as_nova_wrote_it_and_admitted_at_prepare(admitting: Rig, operation: str) -> None:
    # Nova rewrites <numatune> for the destination itself; the hook must not print a changed XML.
    xml = live(with_memnodes(NUMA2, {0: 1, 1: 0}), 5)
    assert admitting.call(NUMA2, operation, "begin", xml) == Call(0, "", "")
    assert admitting.reservations() == []
    assert admitting.call(NUMA2, "prepare", "begin", xml) == Call(0, "", "")
    assert sorted((e.file, e.node) for e in admitting.reservations()) == [("ram-node0", 1), ("ram-node1", 0)]


# ---- admitted: re-adoption after a daemon restart or a lost ledger -----------------------------------------


def numa_maps(rig: Rig, pid: int, path: Path, node: int, pages: int) -> None:
    """The kernel's numa_maps line for QEMU's mapping of ``path``: all its pages on ``node``."""
    (rig.config.host.proc / str(pid) / "numa_maps").write_text(
        f"7f0000000000 default file={path} dirty={pages} N{node}={pages} kernelpagesize_kB=4\n")


@pytest.mark.parametrize("name, file", [(FLAT, "pc.ram"), (NUMA, "ram-node0")])
def test_reconnect_with_an_empty_ledger_re_adopts_from_numatune_or_where_the_pages_are(
        admitting: Rig, name: str, file: str) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    running, directory = start_guest(rig, name, nova_xml(name), 7, 4400)
    numa_maps(rig, 4400, directory / file, 0, 128 * MiB // 4096)
    (rig.config.state.dir / "ledger.json").unlink()
    assert rig.call(name, "reconnect", "begin", running) == Call(0, "", "")
    assert [(e.file, e.node, e.bytes, e.state, e.pid) for e in rig.reservations()] == [
        (file, 0, 128 * MiB, "pinned", 4400)]


def test_reconcile_adopts_a_running_nova_guest_the_ledger_lost(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    _, directory = start_guest(rig, FLAT, nova_xml(FLAT), 7, 4400)
    numa_maps(rig, 4400, directory / "pc.ram", 0, 128 * MiB // 4096)
    (rig.config.state.dir / "ledger.json").write_text("{")
    status.reconcile(rig.context())
    assert [(e.domain, e.file, e.node, e.state) for e in rig.reservations()] == [(FLAT, "pc.ram", 0, "pinned")]


# ---- not file-backed, or not admitted -----------------------------------------------------------------


def test_nova_hugepages_guest_on_a_dmemfs_host_is_left_to_libvirt(admitting: Rig) -> None:
    xml = live(nova_xml(HUGE), 2)
    for operation, subop in [("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                             ("release", "end"), ("reconnect", "begin")]:
        assert admitting.call(HUGE, operation, subop, xml) == Call(0, "", ""), operation
    assert not admitting.config.state.dir.joinpath("ledger.json").exists()


def test_admitted_guest_whose_ram_would_not_land_on_the_mount_is_left_to_libvirt(admitting: Rig,
                                                                                 tmp_path: Path) -> None:
    rig = admitting
    elsewhere = tmp_path / "ram"
    elsewhere.mkdir()
    rig.config = replace(rig.config, libvirt=replace(rig.config.libvirt, memory_backing_dir=elsewhere))
    assert rig.call(FLAT, "prepare", "begin", live(nova_xml(FLAT), 1)) == Call(0, "", "")
    assert rig.reservations() == []


# ---- status ------------------------------------------------------------------------------------------


def test_status_shows_nova_s_instance_name_and_flavor(admitting: Rig) -> None:
    rig = admitting
    set_pool(rig, 1, 0)
    start_guest(rig, NUMA, nova_xml(NUMA), 7, 4400)
    assert rig.call(NUMA2, "prepare", "begin", live(with_memnodes(NUMA2, {0: 0, 1: 0}), 8)).code == 0
    data = status.collect(rig.context())
    domains = {d["name"]: d for d in data["domains"]}
    assert domains[NUMA]["nova"] == {"name": "db-1", "flavor": "dmem.micro.numa"}
    # Not running yet: libvirt has no status file to read Nova's metadata from.
    assert domains[NUMA2]["nova"] is None
    row = next(line for line in status.render(data).splitlines() if line.startswith(NUMA + " "))
    assert row.endswith("4400    db-1 (dmem.micro.numa)")


# ---- Nova's hugepages guests under the hugetlbfs backend ----------------------------------------------


def hugepages_numa2(nodes: dict[int, int]) -> bytes:
    """Nova's XML for hw:numa_nodes=2 with hw:mem_page_size=2MB: one <page> per guest cell, memnodes to ``nodes``."""
    root = etree.fromstring(with_memnodes(NUMA2, nodes))
    backing = root.find("memoryBacking")
    for child in list(backing):
        backing.remove(child)
    pages = etree.SubElement(backing, "hugepages")
    for cell in (0, 1):
        etree.SubElement(pages, "page", size="2048", nodeset=str(cell), unit="KiB")
    for cell in root.iterfind("cpu/numa/cell"):
        cell.set("memAccess", "shared")
    return etree.tostring(root)


def huge_host(tmp_path: Path, admit: bool = True, **pools: tuple[int, int]) -> tuple[config.Config, HookContext]:
    """Two nodes with 2 MiB and 1 GiB hugetlbfs mounts, empty pools that may grow to 256 MiB each."""
    made = make_huge_host(tmp_path, 2, limit={0: "256M", 1: "256M"}, mounted=(PAGE,))
    if admit:
        made = replace(made, adopt=config.AdoptConfig(hugepages="admit"))
    return made, fakehuge_context(made)


def huge_start(ctx: HookContext, made: config.Config, name: str, xml: bytes, cells: dict[int, int],
               pid: int = 4500) -> None:
    """prepare, start and started; QEMU faults each cell's pages on its node (``cells``: cell -> node)."""
    assert huge_call(ctx, name, "prepare", "begin", xml) == Call(0, "", "")
    assert huge_call(ctx, name, "start", "begin", xml) == Call(0, "", "")
    pages = 128 * MiB // len(cells) // PAGE
    for node in cells.values():
        use(made, node, pages)
    qemu_maps(made, name, pid, [ram(f"ram-node{cell}", node, pages) for cell, node in cells.items()])
    assert huge_call(ctx, name, "started", "begin", xml) == Call(0, "", "")


def test_nova_hugepages_guest_is_admitted_with_its_page_size_grown_for_verified_and_given_back(
        tmp_path: Path) -> None:
    made, ctx = huge_host(tmp_path)
    xml = live(nova_xml(HUGE), 5)
    huge_start(ctx, made, HUGE, xml, {0: 0})
    assert [(e.file, e.node, e.bytes, e.page_size, e.backend, e.state, e.pid) for e in ctx.ledger.read()] == [
        ("ram-node0", 0, 128 * MiB, PAGE, "hugetlbfs", "pinned", 4500)]
    assert pool(made, 0) == (64, 0) and pool(made, 1) == (0, 0)
    use(made, 0, -64)
    assert huge_call(ctx, HUGE, "release", "end", xml) == Call(0, "", "")
    assert ctx.ledger.read() == [] and pool(made, 0) == (0, 0)


def test_nova_hugepages_guest_cells_go_where_its_memnodes_say(tmp_path: Path) -> None:
    made, ctx = huge_host(tmp_path)
    xml = live(hugepages_numa2({0: 1, 1: 0}), 5)
    huge_start(ctx, made, NUMA2, xml, {0: 1, 1: 0})
    assert sorted((e.file, e.node, e.bytes) for e in ctx.ledger.read()) == [
        ("ram-node0", 1, 64 * MiB), ("ram-node1", 0, 64 * MiB)]
    assert pool(made, 0) == (32, 0) and pool(made, 1) == (32, 0)


def test_nova_hugepages_guest_beyond_the_nodes_limit_is_refused_at_prepare_with_the_line(tmp_path: Path) -> None:
    made, ctx = huge_host(tmp_path)
    big = live(nova_xml(HUGE, **{"<memory>131072</memory>": "<memory>524288</memory>",
                                 'memory="131072" memAccess': 'memory="524288" memAccess'}), 5)
    result = huge_call(ctx, HUGE, "prepare", "begin", big)
    assert result.code == 1
    assert result.stderr.startswith(f"dmem-libvirt: {HUGE}: guest cell 0 needs 512.0 MiB of 2 MiB huge pages "
                                    "on host node 0")
    assert result.stderr.count("\n") == 1
    assert ctx.ledger.read() == [] and pool(made, 0) == (0, 0)


def test_nova_hugepages_guest_of_a_page_size_the_host_does_not_mount_is_refused(tmp_path: Path) -> None:
    _, ctx = huge_host(tmp_path)
    gib = live(nova_xml(HUGE, **{'<page size="2048"': '<page size="1048576"',
                                 "<memory>131072</memory>": "<memory>1048576</memory>",
                                 'memory="131072" memAccess': 'memory="1048576" memAccess'}), 5)
    assert huge_call(ctx, HUGE, "prepare", "begin", gib) == Call(
        1, "", f"dmem-libvirt: {HUGE}: asks for 1 GiB huge pages; libvirt's hugetlbfs mounts on this host have "
               "2 MiB pages\n")


def test_nova_hugepages_guests_are_left_to_libvirt_unless_admitted(tmp_path: Path) -> None:
    made, ctx = huge_host(tmp_path, admit=False)
    xml = live(nova_xml(HUGE), 5)
    for operation, subop in [("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                             ("release", "end"), ("reconnect", "begin")]:
        assert huge_call(ctx, HUGE, operation, subop, xml) == Call(0, "", ""), operation
    assert not made.state.dir.joinpath("ledger.json").exists() and pool(made, 0) == (0, 0)


def test_reconnect_of_a_running_nova_hugepages_guest_re_adopts_it_on_its_node(tmp_path: Path) -> None:
    made, ctx = huge_host(tmp_path)
    xml = live(nova_xml(HUGE), 5)
    huge_start(ctx, made, HUGE, xml, {0: 0})
    made.state.dir.joinpath("ledger.json").unlink()
    assert huge_call(ctx, HUGE, "reconnect", "begin", xml) == Call(0, "", "")
    assert [(e.file, e.node, e.state, e.pid) for e in ctx.ledger.read()] == [("ram-node0", 0, "pinned", 4500)]


@pytest.mark.parametrize("backing, config_read", [
    ('<source type="memfd"/>', False),
    ('<hugepages>\n      <page size="2048" nodeset="0" unit="KiB"/>\n    </hugepages>', True),
], ids=["memfd", "hugepages"])
def test_hook_reads_the_config_only_for_hugepages_guests_and_imports_no_lifecycle_for_them(
        backing: str, config_read: bool) -> None:
    xml = nova_xml(HUGE).replace(
        b'<hugepages>\n      <page size="2048" nodeset="0" unit="KiB"/>\n    </hugepages>', backing.encode())
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from dmem_libvirt.hook import entry\n"
              "sys.exit(entry())\n")
    done = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c", script, HUGE, "prepare", "begin", "-"],
                          input=xml, capture_output=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert "dmem_libvirt.domain" in imported
    assert ("dmem_libvirt.config" in imported) == config_read
    assert not [m for m in imported if m.startswith("lxml") or m in ("dmem_libvirt.lifecycle", "dmem_libvirt.adopt")]
