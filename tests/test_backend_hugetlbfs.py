"""The hugetlbfs backend on fake sysfs trees: pools per node and size, growth within limits, the kernel giving
less than asked, give-back of the tool's own pages only, started's numa_maps check, adoption, HVO and savings.

Every lifecycle test drives `hook.main` as libvirt would, with the backend's pool writes going to a fake
kernel (tests/fakehuge.py) that caps what a node can give and frees only unused pages.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fakehuge import FakeKernel, context, make_huge_host, pool, set_reserved, use
from lxml import etree
from test_hook import Call, guest_xml, live

from dmem_libvirt import define, domxml, hook, status
from dmem_libvirt.backends.hugetlbfs import hvo_saving
from dmem_libvirt.config import Config
from dmem_libvirt.domain import read_domain
from dmem_libvirt.errors import HostError
from dmem_libvirt.ledger import Reservation
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, KiB, MiB

PAGE = 2 * MiB
WEB = "web01"


def huge(xml: str, nodes: list[int], page_size: int = PAGE) -> bytes:
    """The domain rewritten for the hugetlbfs backend by the real define-time code."""
    return define.plan(xml, page_size=page_size, rooms=None, nodes=nodes, backend="hugetlbfs").rewritten


def call(ctx: HookContext, name: str, operation: str, subop: str, xml: bytes) -> Call:
    out, err = io.StringIO(), io.StringIO()
    code = hook.main(["dmem-libvirt-hook", name, operation, subop, "-"], io.BytesIO(xml), out, err, context=ctx)
    return Call(code, out.getvalue(), err.getvalue())


def qemu(config: Config, name: str, pid: int, maps: list[str]) -> None:
    """A running QEMU for ``name``: libvirt's pid file and a /proc/<pid> with these numa_maps lines."""
    (config.libvirt.run_dir / f"{name}.pid").write_text(f"{pid}\n")
    task = config.host.proc / str(pid)
    task.mkdir(parents=True, exist_ok=True)
    (task / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0\n")
    (task / "numa_maps").write_text("\n".join([
        "55d4c0a00000 default file=/usr/bin/qemu-system-x86_64 mapped=100 N0=100 kernelpagesize_kB=4",
        *maps]) + "\n")


def ram(file: str, node: int, pages: int, *, policy: str | None = None, size_kb: int = 2048) -> str:
    """The numa_maps line of QEMU's preallocated guest RAM on hugetlbfs."""
    return (f"7f0000000000 {policy or f'bind:{node}'} file=/dev/hugepages/libvirt/qemu/5-web01/"
            f"qemu_back_mem.{file}.Xy12Ab\\040(deleted) huge dirty={pages} N{node}={pages} "
            f"kernelpagesize_kB={size_kb}")


def start(ctx: HookContext, config: Config, xml: bytes, pages: dict[int, int], pid: int = 4242) -> None:
    """prepare, start and started as `virsh start` runs them; QEMU faults ``pages`` per guest cell."""
    assert call(ctx, WEB, "prepare", "begin", xml) == Call(0, "", "")
    assert call(ctx, WEB, "start", "begin", xml) == Call(0, "", "")
    dom = read_domain(etree.fromstring(xml))
    assert dom.metadata is not None
    for placed in dom.metadata.cells:
        use(config, placed.node, pages[placed.cell], dom.metadata.page_size)
    qemu(config, WEB, pid, [ram(p.file, p.node, pages[p.cell], size_kb=dom.metadata.page_size // KiB)
                            for p in dom.metadata.cells])
    assert call(ctx, WEB, "started", "begin", xml) == Call(0, "", "")


def stop(ctx: HookContext, config: Config, xml: bytes, pages: dict[int, int]) -> None:
    """QEMU exits (its pages go back to the free count), then stopped end and release end."""
    dom = read_domain(etree.fromstring(xml))
    assert dom.metadata is not None
    for placed in dom.metadata.cells:
        use(config, placed.node, -pages[placed.cell], dom.metadata.page_size)
    (config.libvirt.run_dir / f"{WEB}.pid").unlink(missing_ok=True)
    assert call(ctx, WEB, "stopped", "end", xml) == Call(0, "", "")
    assert call(ctx, WEB, "release", "end", xml) == Call(0, "", "")


# ---- pools, mounts, page sizes ---------------------------------------------------------------------------


def test_pools_are_per_node_counts_of_the_mounts_page_size(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, PAGE): (10, 4), (1, GiB): (2, 2)})
    backend = context(config).backend
    assert backend.page_size() == PAGE
    assert backend.page_sizes() == (PAGE, GiB)
    assert {n: (p.total, p.free) for n, p in backend.pools().items()} == {0: (20 * MiB, 8 * MiB), 1: (0, 0)}
    assert {n: (p.total, p.free) for n, p in backend.pools(GiB).items()} == {0: (0, 0), 1: (2 * GiB, 2 * GiB)}
    assert backend.mount == tmp_path / "hugepages-2M"


def test_status_shows_every_page_size_that_has_pages_each_with_what_guests_hold_of_it(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, PAGE): (10, 4), (1, GiB): (2, 1)})
    ctx = context(config)
    with ctx.ledger.transaction() as book:
        book.add(Reservation(domain="big", uuid="u-big", node=1, bytes=GiB, page_size=GiB, backend="hugetlbfs",
                             file="ram-node1", state="pinned", origin="prepare", created=0.0))
    data = status.collect(ctx)
    assert [(p["node"], p["page_size"], p["total"], p["free"], p["pinned"]) for p in data["pools"]] == [
        (0, PAGE, 20 * MiB, 8 * MiB, 0), (1, PAGE, 0, 0, 0), (1, GiB, 2 * GiB, GiB, GiB)]
    table = status.render(data).splitlines()
    assert table[2:6] == [
        "NODE  PAGE         TOTAL         FREE     RESERVED       PINNED",
        "   0  2 MiB     20.0 MiB      8.0 MiB          0 B          0 B",
        "   1  2 MiB          0 B          0 B          0 B          0 B",
        "   1  1 GiB      2.0 GiB      1.0 GiB          0 B      1.0 GiB"]


def test_without_hugetlbfs_mount_libvirt_uses_the_page_size_is_one_line_with_the_fix(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, mounted=())
    with pytest.raises(HostError) as caught:
        context(config).backend.page_size()
    line = caught.value.line()
    assert "no hugetlbfs mount that libvirt uses: mkdir -p /dev/hugepages && mount -t hugetlbfs" in line


def test_mounts_come_from_proc_mounts_when_qemu_conf_lists_none(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, mounted=(GiB,), listed=False)
    assert context(config).backend.page_sizes() == (GiB,)


def test_an_adopted_guest_keeps_its_page_size_when_the_host_has_it(tmp_path: Path) -> None:
    backend = context(make_huge_host(tmp_path, 1)).backend
    one_gig = ("\n  <memoryBacking>\n    <hugepages>\n      <page size='1' unit='G'/>\n    </hugepages>"
               "\n  </memoryBacking>")
    assert backend.page_size_for(read_domain(etree.fromstring(guest_xml(WEB, memory=GiB, backing=one_gig)))) == GiB
    backend = context(make_huge_host(tmp_path / "b", 1, mounted=(PAGE,))).backend
    assert backend.page_size_for(read_domain(etree.fromstring(guest_xml(WEB, memory=GiB, backing=one_gig)))) == PAGE


# ---- define time --------------------------------------------------------------------------------------------


def test_enable_writes_libvirts_hugepages_xml_per_cell_and_strict_memnodes(tmp_path: Path) -> None:
    root = etree.fromstring(huge(guest_xml(WEB, [64 * MiB, 32 * MiB]), [1, 0]))
    pages = [(p.get("size"), p.get("unit"), p.get("nodeset")) for p in root.iterfind("memoryBacking/hugepages/page")]
    assert pages == [("2048", "KiB", "0"), ("2048", "KiB", "1")]
    memnodes = [(m.get("cellid"), m.get("mode"), m.get("nodeset")) for m in root.iterfind("numatune/memnode")]
    assert memnodes == [("0", "strict", "1"), ("1", "strict", "0")]
    # No file backing of our own: libvirt maps its hugetlbfs mount and QEMU makes the file.
    assert root.find("memoryBacking/source") is None and root.find("memoryBacking/access") is None
    meta = read_domain(root).metadata
    assert meta is not None and meta.backend == "hugetlbfs" and meta.page_size == PAGE


def test_a_cellless_guest_gets_one_page_element_and_numatune_memory(tmp_path: Path) -> None:
    root = etree.fromstring(huge(guest_xml(WEB, memory=64 * MiB), [1]))
    assert [dict(p.attrib) for p in root.iterfind("memoryBacking/hugepages/page")] == [{"size": "2048", "unit": "KiB"}]
    memory = root.find("numatune/memory")
    assert memory is not None and (memory.get("mode"), memory.get("nodeset")) == ("strict", "1")


def test_an_existing_hugepages_guest_is_adopted_and_disable_restores_it_byte_for_byte(tmp_path: Path) -> None:
    backing = ("\n  <memoryBacking>\n    <hugepages>\n      <page size='1048576' unit='KiB'/>\n    </hugepages>"
               "\n    <locked/>\n  </memoryBacking>")
    original = guest_xml(WEB, [GiB], backing=backing)
    rewritten = huge(original, [0], page_size=GiB)
    root = etree.fromstring(rewritten)
    assert [p.get("size") for p in root.iterfind("memoryBacking/hugepages/page")] == [str(GiB // KiB)]
    assert root.find("memoryBacking/locked") is not None
    _, restored = define.undo(rewritten)
    assert restored is not None
    assert domxml.canonical(restored) == domxml.canonical(original)


def test_dmemfs_still_refuses_a_hugepages_guest(tmp_path: Path) -> None:
    backing = "\n  <memoryBacking>\n    <hugepages/>\n  </memoryBacking>"
    with pytest.raises(Exception, match="already puts guest RAM on hugetlbfs"):
        define.plan(guest_xml(WEB, [64 * MiB], backing=backing), page_size=PAGE, rooms=None, nodes=[0])


# ---- prepare: admission and growth ------------------------------------------------------------------------


def test_an_operators_presized_pool_is_used_first_and_never_grown(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(1, PAGE): (64, 64)}, limit={1: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [64 * MiB]), [1]), 5)
    start(ctx, config, xml, {0: 32})
    assert pool(config, 1) == (64, 32)
    assert ctx.backend.writes == []  # type: ignore[attr-defined]
    stop(ctx, config, xml, {0: 32})
    assert pool(config, 1) == (64, 64)
    assert ctx.ledger.read() == [] and ctx.ledger.read_grown() == {}


def test_a_short_pool_grows_by_exactly_the_shortfall_on_that_node_and_gives_exactly_that_back(
        tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(1, PAGE): (10, 10), (0, PAGE): (4, 4)}, limit={0: "1G", 1: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [64 * MiB]), [1]), 5)
    assert call(ctx, WEB, "prepare", "begin", xml) == Call(0, "", "")
    assert pool(config, 1) == (32, 32)
    assert pool(config, 0) == (4, 4)
    assert ctx.ledger.read_grown() == {(1, PAGE): 22}
    stop(ctx, config, xml, {0: 0})
    assert pool(config, 1) == (10, 10)
    assert ctx.ledger.read_grown() == {}


def test_a_guest_beyond_the_limit_is_refused_in_one_line_and_no_pool_changes(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, PAGE): (8, 8)}, limit={0: "64M"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [128 * MiB]), [0]), 5)
    result = call(ctx, WEB, "prepare", "begin", xml)
    assert result == Call(1, "", "dmem-libvirt: web01: guest cell 0 needs 128.0 MiB of 2 MiB huge pages on host "
                                 "node 0; 64.0 MiB free; of that 48.0 MiB by growing the pool (8 pages of 2 MiB) "
                                 "to its limit 64.0 MiB\n")
    assert pool(config, 0) == (8, 8)
    assert ctx.backend.writes == []  # type: ignore[attr-defined]
    assert ctx.ledger.read() == []


def test_a_node_without_a_limit_is_never_grown_and_the_refusal_says_why(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, PAGE): (8, 8)}, limit={1: "1G"})
    ctx = context(config)
    result = call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [64 * MiB]), [0]), 5))
    assert result.code == 1
    assert result.stderr.endswith("16.0 MiB free; the pool (8 pages of 2 MiB) is not grown: "
                                  "no [hugetlbfs.limit] for node 0\n")
    assert pool(config, 0) == (8, 8)


def test_when_the_kernel_gives_less_compaction_is_tried_once_then_the_growth_is_undone(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, PAGE): (4, 4)}, limit={0: "1G"})
    ctx = context(config, capacity={0: 20}, compactable={0: 5})
    result = call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [64 * MiB]), [0]), 5))
    assert result.code == 1
    assert result.stderr == ("dmem-libvirt: web01: needs 64.0 MiB of 2 MiB huge pages on host node 0; 8.0 MiB free; "
                             "the kernel grew the pool by only 21 of the 28 pages asked, after compaction "
                             "(memory too fragmented for 2 MiB pages)\n")
    backend = ctx.backend
    assert isinstance(backend, FakeKernel)
    assert backend.compactions == [0]
    assert backend.writes == [(0, PAGE, 32), (0, PAGE, 32), (0, PAGE, 4)]
    assert pool(config, 0) == (4, 4)
    assert ctx.ledger.read() == [] and ctx.ledger.read_grown() == {}


def test_compaction_that_frees_enough_lets_the_guest_start(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "1G"})
    ctx = context(config, capacity={0: 20}, compactable={0: 20})
    assert call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [64 * MiB]), [0]), 5)).code == 0
    assert pool(config, 0) == (32, 32)
    assert ctx.ledger.read_grown() == {(0, PAGE): 32}


def test_a_two_cell_guest_refused_on_its_second_node_undoes_the_first_nodes_growth(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, limit={0: "1G", 1: "1G"})
    ctx = context(config, capacity={1: 3})
    result = call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [16 * MiB, 16 * MiB]), [0, 1]), 5))
    assert result.code == 1 and "host node 1" in result.stderr
    assert pool(config, 0) == (0, 0) and pool(config, 1) == (0, 0)


def test_a_second_guest_while_the_first_is_still_starting_is_not_given_its_pages(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, pools={(0, PAGE): (32, 32)})
    ctx = context(config)
    assert call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [64 * MiB]), [0]), 5)).code == 0
    # The first QEMU has not faulted anything yet: the pool still shows 32 free pages.
    other = live(huge(guest_xml("db02", [16 * MiB]), [0]), 6)
    result = call(ctx, "db02", "prepare", "begin", other)
    assert result.code == 1
    assert "64.0 MiB free, 64.0 MiB reserved by web01; the pool (32 pages of 2 MiB) is not grown" in result.stderr


def test_pages_reserved_by_a_hugepages_guest_without_metadata_count_as_used(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, pools={(0, PAGE): (32, 32)})
    ctx = context(config)
    plain = live(guest_xml("plain01", memory=16 * MiB,
                           backing="\n  <memoryBacking>\n    <hugepages/>\n  </memoryBacking>").encode(), 4)
    for operation, subop in (("prepare", "begin"), ("start", "begin"), ("started", "begin")):
        assert call(ctx, "plain01", operation, subop, plain) == Call(0, "", "")
    # Its QEMU mapped 8 pages (the kernel reserves them) and has not faulted them yet.
    set_reserved(config, 8)
    result = call(ctx, WEB, "prepare", "begin", live(huge(guest_xml(WEB, [64 * MiB]), [0]), 5))
    assert result.code == 1
    assert "16.0 MiB reserved by mappings without dmem-libvirt metadata" in result.stderr
    assert ctx.ledger.read() == []


# ---- release and recovery ----------------------------------------------------------------------------------


def test_release_never_takes_pages_a_starting_guest_needs(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "1G"})
    ctx = context(config)
    first = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    assert call(ctx, WEB, "prepare", "begin", first).code == 0
    second = live(huge(guest_xml("db02", [16 * MiB]), [0]), 6)
    assert call(ctx, "db02", "prepare", "begin", second).code == 0
    assert pool(config, 0) == (24, 24) and ctx.ledger.read_grown() == {(0, PAGE): 24}
    # web01 fails before QEMU faults anything: its 16 pages go back, db02's 8 stay for it.
    assert call(ctx, WEB, "release", "end", first) == Call(0, "", "")
    assert pool(config, 0) == (8, 8) and ctx.ledger.read_grown() == {(0, PAGE): 8}


def test_pages_in_use_by_someone_else_are_given_back_later_not_lost(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    start(ctx, config, xml, {0: 16})
    use(config, 0, -16)
    use(config, 0, 10)  # a guest without metadata took 10 of the pages
    (config.libvirt.run_dir / f"{WEB}.pid").unlink()
    assert call(ctx, WEB, "release", "end", xml) == Call(0, "", "")
    assert pool(config, 0) == (10, 0) and ctx.ledger.read_grown() == {(0, PAGE): 10}
    use(config, 0, -10)
    assert status.reconcile(ctx) == ["gave back 10 pages of 2 MiB on node 0"]
    assert pool(config, 0) == (0, 0) and ctx.ledger.read_grown() == {}


def test_release_touches_only_the_pools_the_tool_grew(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(1, PAGE): (50, 50), (0, GiB): (1, 1)}, limit={0: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    start(ctx, config, xml, {0: 16})
    stop(ctx, config, xml, {0: 16})
    backend = ctx.backend
    assert isinstance(backend, FakeKernel)
    assert {(node, size) for node, size, _ in backend.writes} == {(0, PAGE)}
    assert pool(config, 1) == (50, 50) and pool(config, 0, GiB) == (1, 1) and pool(config, 0) == (0, 0)


def test_a_killed_guest_found_by_orphan_collection_gives_its_pages_back(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    start(ctx, config, xml, {0: 16})
    # QEMU dies and libvirtd with it: no release end ever comes.
    use(config, 0, -16)
    (config.libvirt.run_dir / f"{WEB}.pid").unlink()
    (config.host.proc / "4242" / "stat").unlink()
    ctx.clock = lambda: 10**10
    assert status.reconcile(ctx) == ["freed web01 (32.0 MiB on node 0)"]
    assert pool(config, 0) == (0, 0) and ctx.ledger.read_grown() == {}


# ---- started ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "problem"), [
    (ram("ram-node0", 1, 16), "has memory policy bind:1, expected bind:0"),
    (ram("ram-node0", 0, 16, size_kb=4), "is in 4 KiB pages, expected 2 MiB huge pages"),
    (ram("ram-node0", 0, 8), "has 16.0 MiB faulted on host node 0, expected 32.0 MiB"),
    (ram("pc.ram", 0, 16), "is not on hugetlbfs (no qemu_back_mem.ram-node0 mapping)"),
])
def test_started_refuses_guest_ram_that_is_not_bound_huge_memory_of_the_node(
        tmp_path: Path, line: str, problem: str) -> None:
    config = make_huge_host(tmp_path, 2, limit={0: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    assert call(ctx, WEB, "prepare", "begin", xml).code == 0
    assert call(ctx, WEB, "start", "begin", xml).code == 0
    qemu(config, WEB, 4242, [line])
    result = call(ctx, WEB, "started", "begin", xml)
    assert result == Call(1, "", f"dmem-libvirt: web01: QEMU (pid 4242) guest RAM ram-node0 {problem}\n")


def test_started_marks_the_pages_faulted_so_they_stop_counting_as_in_flight(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "64M"})
    ctx = context(config)
    start(ctx, config, live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5), {0: 16})
    assert [e.state for e in ctx.ledger.read()] == ["pinned"]
    other = live(huge(guest_xml("db02", [32 * MiB]), [0]), 6)
    assert call(ctx, "db02", "prepare", "begin", other).code == 0
    assert pool(config, 0) == (32, 16)


def test_libvirtd_restart_readopts_a_running_guest_without_touching_the_pool(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, limit={0: "1G"})
    ctx = context(config)
    xml = live(huge(guest_xml(WEB, [32 * MiB]), [0]), 5)
    start(ctx, config, xml, {0: 16})
    (config.state.dir / "ledger.json").unlink()  # lost with the state directory
    assert call(ctx, WEB, "reconnect", "begin", xml) == Call(0, "", "")
    assert [(e.state, e.node, e.bytes) for e in ctx.ledger.read()] == [("pinned", 0, 32 * MiB)]
    assert pool(config, 0) == (16, 0)


# ---- HVO and savings ----------------------------------------------------------------------------------------


def test_hvo_saving_per_page_is_the_struct_pages_minus_the_one_page_kept() -> None:
    assert hvo_saving(PAGE) == 28 * KiB
    assert hvo_saving(GiB) == 16380 * KiB


def test_savings_are_measured_from_the_kernels_memmap_counters(tmp_path: Path) -> None:
    # 192 blocks of 128 MiB: a full vmemmap is 98,304 pages; 512 pages of 2 MiB under HVO freed 3,584.
    config = make_huge_host(tmp_path, 1, hvo="1", memmap=(0, 98304 - 3584), memory_blocks=192)
    saved = context(config).backend.savings()
    assert (saved.bytes, saved.measured) == (512 * 28 * KiB, True)


def test_without_the_kernel_counters_savings_are_computed_from_the_pools(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, hvo="1", pools={(0, PAGE): (100, 100), (1, GiB): (2, 0)})
    saved = context(config).backend.savings()
    assert (saved.bytes, saved.measured) == (100 * 28 * KiB + 2 * 16380 * KiB, False)
    config = make_huge_host(tmp_path / "off", 1, hvo="0", pools={(0, PAGE): (100, 100)})
    assert context(config).backend.savings().bytes == 0


@pytest.mark.parametrize(("hvo", "expected"), [
    ("1", "ok    HVO is on"),
    ("0", "FAIL  HVO is off: each huge page keeps all its struct pages\n      fix: sysctl "
          "vm.hugetlb_optimize_vmemmap=1 (or hugetlb_free_vmemmap=on at boot); pages already in a pool keep "
          "their vmemmap until they are freed"),
    (None, "FAIL  HVO is not supported"),
])
def test_check_reports_hvo_with_its_fix(tmp_path: Path, hvo: str | None, expected: str) -> None:
    from dmem_libvirt import cli

    make_huge_host(tmp_path, 1, hvo=hvo, limit={0: "1G", 3: "1G"})
    out = io.StringIO()
    cli.main(["--config", str(tmp_path / "config.toml"), "check"], stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    assert expected in text
    assert f"ok    {tmp_path / 'hugepages-2M'} is a hugetlbfs mount of 2 MiB pages that libvirt uses" in text
    assert "ok    host node 0: 0 pages of 2 MiB (0 free), may grow to 1.0 GiB" in text
    assert "FAIL  [hugetlbfs.limit] names host node 3, which is not online" in text


def test_check_says_when_the_configured_mount_is_not_one_libvirt_uses(tmp_path: Path) -> None:
    from dmem_libvirt import cli

    make_huge_host(tmp_path, 1, hvo="1", mounted=(PAGE,))
    other = tmp_path / "hugepages-1G"
    mounts = tmp_path / "proc" / "mounts"
    mounts.write_text(mounts.read_text() + f"hugetlbfs {other} hugetlbfs rw,pagesize=1G 0 0\n")
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text()
                                          + f'\n[hugetlbfs]\nmount = "{other}"\n')
    out = io.StringIO()
    assert cli.main(["--config", str(tmp_path / "config.toml"), "check"], stdout=out, stderr=io.StringIO()) == 1
    assert (f"FAIL  {other} is not in hugetlbfs_mount of {tmp_path}/etc/libvirt/qemu.conf: libvirt will not use it"
            in out.getvalue())


def test_a_file_backed_guest_of_someone_else_starts_on_a_host_without_a_hugetlbfs_mount(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 1, mounted=())
    backing = "\n  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>"
    xml = live(guest_xml("files01", memory=16 * MiB, backing=backing).encode(), 3)
    assert call(context(config), "files01", "prepare", "begin", xml) == Call(0, "", "")


def test_an_incoming_migration_is_placed_at_migrate_and_grown_and_booked_once_at_prepare(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, limit={0: "1G", 1: "1G"})
    ctx = context(config)
    xml = huge(guest_xml(WEB, [32 * MiB]), [1])
    # libvirt may still turn the guest away after migrate begin without another hook call: nothing is held yet.
    assert call(ctx, WEB, "migrate", "begin", xml).code == 0
    assert pool(config, 1) == (0, 0) and ctx.ledger.read() == [] and ctx.ledger.read_grown() == {}
    assert call(ctx, WEB, "prepare", "begin", live(xml, 7)) == Call(0, "", "")
    assert pool(config, 1) == (16, 16) and ctx.ledger.read_grown() == {(1, PAGE): 16}
    assert [(e.node, e.origin) for e in ctx.ledger.read()] == [(1, "prepare")]
    assert call(ctx, WEB, "release", "end", live(xml, 7)) == Call(0, "", "")
    assert pool(config, 1) == (0, 0) and ctx.ledger.read_grown() == {}
