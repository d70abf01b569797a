# ruff: noqa: F811
"""Guests shaped as OpenStack Nova defines them, through real `virsh define/start` under the hook.

The domains are tests/data/nova/*.xml (Nova's file-backed memory with <discard/>, its <numatune> memnodes,
its <nova:instance> metadata), with <domain type> set to what the sandbox runs.  The sandbox's config gets
``[adopt] file_backed = "admit"`` for these tests and its own setting back afterwards.  The hugepages
guests run on the hugetlbfs backend through the hugetlbfs tests' fixtures (imported: `huge`, which restores
the machine's real pools after each test, and the module-wide `host_pools`); live migration runs between
the two sandbox hosts of the migration tests (`hosts`, and `huge_hosts` for hugepages guests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hostpools import PAGE, HostPools, pool
from lxml import etree

from dmem_libvirt.units import GiB, MiB

from .test_hook_e2e import (
    STATE_DIR,
    assert_all_memory_returned,
    assert_pinned_and_mapped,
    domstate,
    files_on_mount,
    hook_line,
    memory_backends,
    pinned_files,
    reservations_of,
    status,
)
from .test_hugetlbfs_e2e import Huge, host_pools, huge  # noqa: F401
from .test_migration import assert_empty, hosts, wait_holding  # noqa: F401
from .test_migration_hugetlbfs import huge_hosts  # noqa: F401
from sandbox import Sandbox, with_domain_type

NOVA_DATA = Path(__file__).resolve().parent.parent / "data" / "nova"
CONFIG = "/etc/dmem-libvirt/config.toml"
ADMIT_FILE_BACKED = '\n[adopt]\nfile_backed = "admit"\n'
FLAT = "instance-0000000a"
NUMA = "instance-0000000b"


def nova_domain(box: Sandbox, file: str, memory: int | None = None) -> str:
    """Nova's XML for this sandbox: its <domain type>, ``memory`` bytes when given (no NUMA cells), and
    check='none' on Nova's qemu64 CPU, which libvirt otherwise refuses on this nested host (no svm)."""
    root = etree.fromstring(with_domain_type((NOVA_DATA / file).read_text(), box.domain_type, memory).encode())
    root.find("cpu").set("check", "none")
    return etree.tostring(root, encoding="unicode") + "\n"


@pytest.fixture
def admitting(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The sandbox with adoption on; every test leaves the pool empty and its Nova guests undefined."""
    config = sandbox.private(CONFIG)
    before = config.read_text()
    config.write_text(before + ADMIT_FILE_BACKED)
    assert_all_memory_returned(sandbox)
    try:
        yield sandbox
    finally:
        for name in (FLAT, NUMA):
            sandbox.virsh("destroy", name, check=False)
            sandbox.virsh("undefine", name, check=False)
        config.write_text(before)
    assert_all_memory_returned(sandbox)


@pytest.mark.parametrize("name, file, backing, nova", [
    (FLAT, "instance-flat.xml", {"mem-path": "pc.ram"}, {"name": "web-1", "flavor": "dmem.micro"}),
    (NUMA, "instance-numa.xml", {"mem-path": "ram-node0", "host-nodes": [0], "policy": "bind"},
     {"name": "db-1", "flavor": "dmem.micro.numa"}),
], ids=["no-numa-topology", "memnode"])
def test_nova_guest_is_admitted_pinned_on_node_0_and_given_back(
        admitting: Sandbox, name: str, file: str, backing: dict[str, object], nova: dict[str, str]) -> None:
    box = admitting
    box.define(nova_domain(box, file))
    box.virsh("start", name)
    [backend] = memory_backends(box, name)
    assert (backend["qom-type"], backend["size"]) == ("memory-backend-file", 128 * MiB)
    assert {key: Path(backend[key]).name if key == "mem-path" else backend.get(key) for key in backing} == backing
    assert list(pinned_files(box, name)) == [backend["mem-path"]]
    pid = assert_pinned_and_mapped(box, name, 128 * MiB)
    assert [(r["node"], r["file"]) for r in reservations_of(box, name)] == [(0, backing["mem-path"])]
    [dom] = status(box)["domains"]
    assert (dom["name"], dom["pid"], dom["nova"]) == (name, pid, nova)
    box.virsh("destroy", name)
    assert_all_memory_returned(box)


def test_hard_reboot_destroy_undefine_define_start_keeps_one_reservation_and_leaks_nothing(
        admitting: Sandbox) -> None:
    box = admitting
    xml = nova_domain(box, "instance-numa.xml")
    box.define(xml)
    box.virsh("start", NUMA)
    first = box.qemu_pid(NUMA)
    # What Nova's hard reboot (and power-on) does to the domain.
    box.virsh("destroy", NUMA)
    box.virsh("undefine", NUMA)
    box.define(xml)
    box.virsh("start", NUMA)
    pid = assert_pinned_and_mapped(box, NUMA, 128 * MiB)
    assert pid != first
    uuid = etree.fromstring(xml.encode()).findtext("uuid")
    assert [(r["uuid"], r["file"]) for r in status(box)["reservations"]] == [(uuid, "ram-node0")]
    assert len(files_on_mount(box)) == 1
    box.virsh("destroy", NUMA)
    assert_all_memory_returned(box)


@pytest.mark.parametrize("name, file", [(FLAT, "instance-flat.xml"), (NUMA, "instance-numa.xml")],
                         ids=["from-qemu-pages", "from-memnode"])
def test_restarting_libvirtd_after_the_ledger_was_lost_re_adopts_the_running_nova_guest(
        admitting: Sandbox, name: str, file: str) -> None:
    # Without <numatune> the node comes from where QEMU's pages are (its real /proc/<pid>/numa_maps).
    box = admitting
    box.define(nova_domain(box, file))
    box.virsh("start", name)
    pid = box.qemu_pid(name)
    (box.private(STATE_DIR) / "ledger.json").unlink()
    box.restart_libvirtd()
    assert domstate(box, name) == "running"
    assert assert_pinned_and_mapped(box, name, 128 * MiB) == pid
    # The first transaction after the loss rebuilds the running guests, adopted ones included.
    assert [(r["node"], r["origin"]) for r in reservations_of(box, name)] == [(0, "rebuilt")]


@pytest.mark.parametrize("name, file, nodes", [(FLAT, "instance-flat.xml", None),
                                              (NUMA, "instance-numa.xml", [0])], ids=["no-numa-topology", "memnode"])
def test_nova_guest_live_migrates_as_nova_asks_pinned_on_the_destination_and_given_back_by_the_source(
        hosts: tuple[Sandbox, Sandbox], name: str, file: str, nodes: list[int] | None) -> None:
    source, destination = hosts
    before = {box: box.config_file.read_text() for box in hosts}
    try:
        for box in hosts:
            box.use_config(before[box] + ADMIT_FILE_BACKED)
        source.define(nova_domain(source, file))
        source.virsh("start", name)
        # Nova's libvirt driver: live, peer to peer, persistent on the destination, undefined on the source.
        source.migrate(name, destination, "--live", "--p2p", "--persistent", "--undefinesource")
        assert domstate(destination, name) == "running"
        assert_pinned_and_mapped(destination, name, 128 * MiB)
        [backend] = memory_backends(destination, name)
        assert backend.get("host-nodes") == nodes
        assert [r["origin"] for r in reservations_of(destination, name)] == ["prepare"]
        assert name not in source.virsh("list", "--all", "--name").stdout.split()
        wait_holding(source, [])
        assert_empty(source)
        destination.virsh("destroy", name)
        wait_holding(destination, [])
    finally:
        for box in hosts:
            box.use_config(before[box])


def test_nova_guest_beyond_the_pool_is_refused_at_prepare_with_the_line(admitting: Sandbox) -> None:
    box = admitting
    box.define(nova_domain(box, "instance-flat.xml", 4 * GiB))
    refused = box.virsh("start", FLAT, check=False)
    assert refused.returncode == 1
    line = hook_line(refused.stderr)
    assert line.startswith(f"dmem-libvirt: {FLAT}: guest needs 4.0 GiB of 2 MiB dmem pages on ")
    assert domstate(box, FLAT) == "shut off"
    assert status(box)["reservations"] == []


def test_nova_guest_is_refused_when_adoption_is_off(sandbox: Sandbox) -> None:
    sandbox.define(nova_domain(sandbox, "instance-flat.xml"))
    try:
        refused = sandbox.virsh("start", FLAT, check=False)
        assert hook_line(refused.stderr) == (f"dmem-libvirt: {FLAT}: memory_backing_dir is on dmemfs; "
                                             f"run 'dmem-libvirt enable {FLAT}' or use memfd")
    finally:
        sandbox.virsh("undefine", FLAT, check=False)


# ---- Nova's hw:mem_page_size guests under the hugetlbfs backend, on the machine's real pools ------------

HUGE = "instance-0000000d"
ADMIT_HUGEPAGES = '\n[adopt]\nhugepages = "admit"\n'


def nova_hugepages(huge: Huge, limit: int) -> str:
    """Nova's hw:mem_page_size=2MB guest defined in the sandbox, run by the hugetlbfs backend with ``limit``."""
    huge.box.use_config(huge.box.hugetlbfs_config({0: limit}) + ADMIT_HUGEPAGES)
    huge.box.define(nova_domain(huge.box, "instance-hugepages.xml"))
    huge.names.append(HUGE)
    return HUGE


def test_nova_hugepages_guest_is_admitted_grown_on_its_memnode_verified_and_given_back(huge: Huge) -> None:
    name = nova_hugepages(huge, huge.base * PAGE + GiB)
    result = huge.start(name)
    assert result.returncode == 0, result.stderr
    assert pool()[0] == huge.base + 64
    [reservation] = huge.status()["reservations"]
    assert (reservation["file"], reservation["node"], reservation["page_size"], reservation["state"]) == \
        ("ram-node0", 0, PAGE, "pinned")
    [dom] = huge.status()["domains"]
    assert dom["nova"] == {"name": "cache-1", "flavor": "dmem.micro.huge"}
    huge.box.virsh("destroy", name)
    assert pool()[0] == huge.base
    assert huge.status()["reservations"] == []


def test_nova_hugepages_guest_beyond_the_limit_is_refused_before_qemu_runs(huge: Huge) -> None:
    name = nova_hugepages(huge, huge.base * PAGE + 64 * MiB)
    before = HostPools.take()
    result = huge.start(name)
    assert result.returncode == 1
    assert hook_line(result.stderr).startswith(
        f"dmem-libvirt: {name}: guest cell 0 needs 128.0 MiB of 2 MiB huge pages on host node 0; ")
    assert HostPools.take() == before
    assert huge.status()["reservations"] == []


def test_nova_hugepages_guest_live_migrates_as_nova_asks_onto_pages_the_destination_grew(
        huge_hosts: tuple[Sandbox, Sandbox, int]) -> None:
    source, destination, base = huge_hosts
    for box in (source, destination):
        box.use_config(box.hugetlbfs_config({0: base * PAGE + GiB}) + ADMIT_HUGEPAGES)
    source.define(nova_domain(source, "instance-hugepages.xml"))
    source.virsh("start", HUGE)
    assert pool()[0] == base + 64
    source.migrate(HUGE, destination, "--live", "--p2p", "--persistent", "--undefinesource")
    assert domstate(destination, HUGE) == "running"
    held = [(r["file"], r["state"], r["bytes"], r["page_size"], r["pid"]) for r in reservations_of(destination, HUGE)]
    assert held == [("ram-node0", "pinned", 128 * MiB, PAGE, destination.qemu_pid(HUGE))]
    assert HUGE not in source.virsh("list", "--all", "--name").stdout.split()
    wait_holding(source, [])
    # Both hosts share this kernel's pool: the source gave back its growth, the destination's holds the guest.
    assert pool()[0] == base + 64
    destination.virsh("destroy", HUGE)
    wait_holding(destination, [])
    assert pool()[0] == base
