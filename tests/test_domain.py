"""The read-only domain model: what it reads from libvirt XML, what it refuses and warns about."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dmem_libvirt import may_concern_us
from dmem_libvirt.domain import (
    NS,
    CellPlacement,
    aligned_sizes,
    backing_files,
    cell_host_cpus,
    hole_punch_warnings,
    parse_cpuset,
    read_domain,
    unsupported,
)
from dmem_libvirt.errors import DomainXMLError

MiB, GiB = 1 << 20, 1 << 30
DATA = Path(__file__).parent / "data" / "rewrite"


def domain(body: str = "", *, memory: str = "<memory unit='GiB'>4</memory>", name: str = "web01",
           arch: str = "x86_64") -> ET.Element:
    return ET.fromstring(
        f"<domain type='kvm'><name>{name}</name>{memory}<vcpu>4</vcpu>"
        f"<os><type arch='{arch}'>hvm</type></os>{body}</domain>"
    )


TWO_CELLS = ("<cpu><numa><cell id='0' cpus='0-1' memory='2' unit='GiB'/>"
             "<cell id='1' cpus='2-3' memory='2097152'/></numa></cpu>")


def test_sizes_are_bytes_whatever_unit_libvirt_used():
    dom = read_domain(domain(TWO_CELLS))
    assert dom.memory == 4 * GiB
    assert [(c.id, c.size, c.vcpus) for c in dom.cells] == [(0, 2 * GiB, {0, 1}), (1, 2 * GiB, {2, 3})]


def test_cells_without_id_are_numbered_in_document_order():
    dom = read_domain(domain("<cpu><numa><cell cpus='0' memory='1024'/>"
                             "<cell cpus='1' memory='1024'/></numa></cpu>"))
    assert [cell.id for cell in dom.cells] == [0, 1]


def test_guest_without_cells_has_no_cells():
    dom = read_domain(domain())
    assert dom.cells == ()
    assert dom.metadata is None


def test_vcpu_pins_and_vcpu_cpuset_are_read_as_cpu_sets():
    dom = read_domain(ET.fromstring(
        "<domain><name>p</name><memory>1024</memory><vcpu cpuset='0-3'>2</vcpu>"
        "<cputune><vcpupin vcpu='0' cpuset='4-6,^5'/><vcpupin vcpu='1' cpuset='8'/></cputune></domain>"))
    assert dom.vcpu_pins == {0: frozenset({4, 6}), 1: frozenset({8})}
    assert dom.vcpu_cpuset == frozenset({0, 1, 2, 3})


@pytest.mark.parametrize("text", ["0-", "a", "3-1", "1,,2", "^", "0-2x", "²"])
def test_malformed_cpu_list_is_refused_quoting_it(text):
    with pytest.raises(DomainXMLError) as err:
        parse_cpuset(text, "<vcpu cpuset>")
    assert repr(text) in err.value.line()


def test_malformed_cell_size_names_the_domain_and_the_cell():
    root = domain("<cpu><numa><cell id='0' cpus='0' memory='lots'/></numa></cpu>")
    with pytest.raises(DomainXMLError) as err:
        read_domain(root)
    assert err.value.line().startswith("dmem-libvirt: web01: guest cell 0")
    assert "'lots'" in err.value.line()


@pytest.mark.parametrize(("xml", "message"), [
    ("<network><name>x</name></network>", "root element is <network>, not <domain>"),
    ("<domain><memory>1</memory></domain>", "has no <name>"),
])
def test_not_a_domain_is_refused(xml, message):
    with pytest.raises(DomainXMLError, match=message):
        read_domain(ET.fromstring(xml))


@pytest.mark.parametrize(("backing", "expected"), [
    ("", False),
    ("<memoryBacking><source type='file'/></memoryBacking>", True),
    ("<memoryBacking><access mode='shared'/></memoryBacking>", True),
    ("<memoryBacking><source type='file'/><access mode='private'/></memoryBacking>", True),
    ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>", False),
    ("<memoryBacking><source type='anonymous'/></memoryBacking>", False),
    ("<memoryBacking><nosharepages/></memoryBacking>", False),
])
def test_file_backed_means_libvirt_gives_qemu_a_memory_backend_file(backing, expected):
    assert read_domain(domain(backing)).file_backed is expected


@pytest.mark.parametrize(("xml", "expected"), [
    (b"<domain><name>plain</name><memory>1024</memory></domain>", False),
    (b"<domain><name>m</name><memoryBacking><nosharepages/></memoryBacking></domain>", True),
    (b"<domain><metadata><dmem:memory xmlns:dmem='http://dmem-libvirt.org/xmlns/domain/1'/></metadata></domain>",
     True),
])
def test_hook_pre_check_spots_only_guests_that_may_concern_us(xml, expected):
    assert may_concern_us(xml) is expected


@pytest.mark.parametrize(("body", "page_size", "words"), [
    ("<memoryBacking><hugepages/></memoryBacking>", 2 * MiB, "<memoryBacking><hugepages/>"),
    ("<memoryBacking><source type='memfd'/></memoryBacking>", 2 * MiB, "source type='memfd'"),
    ("<memoryBacking><source type='anonymous'/></memoryBacking>", 2 * MiB, "source type='anonymous'"),
    ("<memoryBacking><locked/></memoryBacking>", 2 * MiB, "<locked/> is not needed on dmem"),
    ("<devices><memory model='dimm'><target><size>1</size></target></memory></devices>", 2 * MiB,
     "<memory model='dimm'> is not backed by dmem yet"),
    ("<devices><memory model='nvdimm'/></devices>", 2 * MiB, "model='nvdimm'"),
    ("<devices><memory model='virtio-mem'/></devices>", 2 * MiB, "model='virtio-mem'"),
    ("<devices><memory model='virtio-pmem'/></devices>", 2 * MiB, "model='virtio-pmem'"),
    ("", GiB, "1 GiB dmemfs pages need QEMU align=1 GiB, which libvirt cannot express"),
    ("", 3 * MiB, "page size 3145728 bytes is not a power of two"),
])
def test_unsupported_guest_gets_one_line_naming_the_element(body, page_size, words):
    reason = unsupported(read_domain(domain(body)), page_size)
    assert reason is not None
    assert words in reason
    assert "\n" not in reason


def test_non_x86_guest_is_unsupported():
    reason = unsupported(read_domain(domain(arch="aarch64")), 2 * MiB)
    assert reason is not None and "arch='aarch64'" in reason


@pytest.mark.parametrize("memory", ["", "<memory unit='KiB'>0</memory>"])
def test_guest_without_memory_size_is_unsupported(memory):
    reason = unsupported(read_domain(domain(memory=memory)), 2 * MiB)
    assert reason is not None and "<memory>" in reason


@pytest.mark.parametrize("page_size", [4096, 2 * MiB])
def test_ordinary_guest_is_supported(page_size):
    assert unsupported(read_domain(domain(TWO_CELLS + "<memoryBacking><nosharepages/></memoryBacking>")),
                       page_size) is None


def test_one_gib_pages_are_fine_on_hugetlbfs():
    assert unsupported(read_domain(domain()), GiB, backend="hugetlbfs") is None


def test_features_that_punch_holes_are_warned_about():
    root = domain("<memoryBacking><discard/></memoryBacking>"
                  "<cpu><numa><cell id='0' cpus='0-3' memory='4' unit='GiB' discard='yes'/></numa></cpu>"
                  "<devices><memballoon model='virtio' freePageReporting='on'/></devices>")
    dom = read_domain(root)
    assert hole_punch_warnings(dom) == [
        "<memoryBacking><discard/> frees nothing on dmemfs (no hole punching)",
        "guest cell 0 discard='yes' frees nothing on dmemfs (no hole punching)",
        "memballoon freePageReporting frees nothing on dmemfs (no hole punching)",
    ]
    assert hole_punch_warnings(dom, backend="hugetlbfs") == []
    assert hole_punch_warnings(read_domain(domain())) == []


def test_misaligned_cell_is_refused_with_the_nearest_valid_sizes():
    dom = read_domain(domain("<cpu><numa><cell id='0' cpus='0-1' memory='2' unit='GiB'/>"
                             "<cell id='1' cpus='2-3' memory='1025' unit='MiB'/></numa></cpu>"))
    with pytest.raises(DomainXMLError) as err:
        aligned_sizes(dom, 2 * MiB, round_up=False)
    assert err.value.line() == ("dmem-libvirt: web01: guest cell 1 is 1025 MiB, not a multiple of "
                                "2 MiB pages; use 1 GiB or 1026 MiB, or --round to round up")
    assert aligned_sizes(dom, 2 * MiB, round_up=True) == (2 * GiB, 1026 * MiB)
    assert aligned_sizes(dom, 4096, round_up=False) == (2 * GiB, 1025 * MiB)


def test_cellless_guest_is_sized_by_its_memory():
    dom = read_domain(domain(memory="<memory unit='KiB'>1025</memory>"))
    with pytest.raises(DomainXMLError, match=r"<memory> is 1025 KiB, not a multiple of 4 MiB pages; use 4 M"):
        aligned_sizes(dom, 4 * MiB, round_up=False)
    assert aligned_sizes(dom, 4 * MiB, round_up=True) == (4 * MiB,)


def test_cell_host_cpus_follow_vcpupin_then_vcpu_cpuset():
    root = ET.fromstring(
        "<domain><name>p</name><memory>1024</memory><vcpu cpuset='20-21'>4</vcpu>"
        "<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/></cputune>"
        "<cpu><numa><cell id='0' cpus='0-1' memory='512'/><cell id='1' cpus='2-3' memory='512'/></numa></cpu>"
        "</domain>")
    dom = read_domain(root)
    assert cell_host_cpus(dom, 0) == {2, 3}
    assert cell_host_cpus(dom, 1) == {20, 21}


def test_unpinned_cell_has_no_host_cpus_and_cellless_guest_uses_all_vcpus():
    assert cell_host_cpus(read_domain(domain(TWO_CELLS)), 1) == frozenset()
    root = ET.fromstring("<domain><name>p</name><memory>1024</memory><vcpu>2</vcpu><cputune>"
                         "<vcpupin vcpu='0' cpuset='5'/><vcpupin vcpu='1' cpuset='7'/></cputune></domain>")
    assert cell_host_cpus(read_domain(root), 0) == {5, 7}


def test_metadata_tells_the_backing_files():
    dom = read_domain(ET.fromstring((DATA / "two-cells-out.xml").read_bytes()))
    assert dom.metadata is not None
    assert dom.metadata.backend == "dmemfs" and dom.metadata.page_size == 2 * MiB
    assert not dom.metadata.cellless
    assert backing_files(dom) == [CellPlacement(0, 0, 2 * GiB, "ram-node0"),
                                  CellPlacement(1, 1, 2 * GiB, "ram-node1")]
    cellless = read_domain(ET.fromstring((DATA / "cellless-out.xml").read_bytes()))
    assert cellless.metadata is not None and cellless.metadata.cellless
    assert backing_files(cellless) == [CellPlacement(0, 1, 2 * GiB, "pc.ram")]


def test_domain_without_metadata_has_no_backing_files():
    with pytest.raises(DomainXMLError, match=r"^dmem-libvirt: web01: has no dmem-libvirt metadata"):
        backing_files(read_domain(domain()))


@pytest.mark.parametrize(("attrs", "message"), [
    ("version='2' backend='dmemfs' page-size='4096'", "metadata version '2' is not understood"),
    ("version='1' page-size='4096'", "has no backend="),
    ("version='1' backend='dmemfs' page-size='2M'", "page-size '2M' is not a whole number"),
])
def test_metadata_we_cannot_understand_is_refused(attrs, message):
    root = domain(f"<metadata><m:memory xmlns:m='{NS}' {attrs}/></metadata>")
    with pytest.raises(DomainXMLError, match=message):
        read_domain(root)


def test_metadata_file_name_cannot_leave_the_memory_directory():
    root = domain(f"<metadata><m:memory xmlns:m='{NS}' version='1' backend='dmemfs' page-size='4096'>"
                  "<m:cell id='0' node='0' bytes='4096' file='../../etc/x'/>"
                  "</m:memory></metadata>")
    with pytest.raises(DomainXMLError, match="bad file="):
        read_domain(root)


def test_reading_a_domain_does_not_import_lxml():
    code = "import sys, dmem_libvirt.domain; print(sorted(m for m in sys.modules if m.startswith('lxml')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
