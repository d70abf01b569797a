"""Define-time XML: hostile input, refusals that leave the tree alone, undo, retarget, serialization."""

from __future__ import annotations

from pathlib import Path

import pytest
from testdriver import libvirt_formatted

from dmem_libvirt import domxml
from dmem_libvirt.domain import read_domain
from dmem_libvirt.errors import DomainXMLError

DATA = Path(__file__).parent / "data" / "rewrite"
MiB, GiB = 1 << 20, 1 << 30
PLAIN = b"<domain type='kvm'><name>web01</name><memory unit='GiB'>2</memory><vcpu>2</vcpu></domain>"


def refusal(data: bytes | str) -> str:
    """The one line parse() refuses `data` with (any other exception fails the test)."""
    with pytest.raises(DomainXMLError) as err:
        domxml.parse(data)
    line = err.value.line()
    assert "\n" not in line and line.startswith("dmem-libvirt: ")
    return line


def rewritten_text(data: bytes, placement: dict[int, int], **kwargs: object) -> bytes:
    tree = domxml.parse(data)
    domxml.rewrite(tree, placement, 2 * MiB, **kwargs)  # type: ignore[arg-type]
    return domxml.serialize(tree)


LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain><name>laughs</name><memory>1024</memory><description>&lol9;</description></domain>
"""


def test_billion_laughs_is_refused_without_expanding():
    assert "has a DOCTYPE or entity declarations" in refusal(LAUGHS)


def test_external_entity_is_refused_and_the_file_never_read():
    line = refusal(b'<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                   b"<domain><name>x</name><memory>1</memory><description>&x;</description></domain>")
    assert "DOCTYPE" in line and "root:" not in line


def test_external_dtd_is_refused():
    assert "DOCTYPE" in refusal(b'<!DOCTYPE domain SYSTEM "file:///etc/passwd">'
                                b"<domain><name>x</name><memory>1</memory></domain>")


def test_fifty_megabyte_document_is_refused_before_parsing():
    padding = b"<!--" + b"x" * (50 * MiB) + b"-->"
    line = refusal(b"<domain><name>big</name><memory>1</memory>" + padding + b"</domain>")
    assert "is 50.000 MiB; refusing more than 10.0 MiB" in line


@pytest.mark.parametrize(("data", "words"), [
    (b"", "domain XML is empty"),
    (b"  \n ", "domain XML is empty"),
    (b"not xml at all", "not well-formed XML"),
    (b"<domain><name>x</name><memory>1</memory>", "not well-formed XML"),
    (b"<network><name>default</name></network>", "root element <network>, not <domain>"),
    (b"<domain><memory>1</memory></domain>", "has no <name>"),
    (b"<domain><name>nomem</name></domain>", "dmem-libvirt: nomem: domain XML has no <memory> element"),
])
def test_bad_input_gets_one_line_refusal(data, words):
    assert words in refusal(data)


def test_text_input_is_accepted_with_or_without_an_encoding_declaration():
    plain = "<domain><name>é</name><memory>1</memory></domain>"
    assert read_domain(domxml.parse(plain).getroot()).name == "é"
    declared = "<?xml version='1.0' encoding='ISO-8859-1'?><domain><name>é</name><memory>1</memory></domain>"
    assert read_domain(domxml.parse(declared).getroot()).name == "é"


@pytest.mark.parametrize(("body", "words"), [
    ("<memoryBacking><hugepages/></memoryBacking>", "<memoryBacking><hugepages/>"),
    ("<memoryBacking><locked/></memoryBacking>", "<locked/>"),
    ("<devices><memory model='virtio-mem'/></devices>", "virtio-mem"),
    ("<cpu><numa><cell id='0' cpus='0-1' memory='1025' unit='MiB'/></numa></cpu>",
     "guest cell 0 is 1025 MiB, not a multiple of 2 MiB pages; use 1 GiB or 1026 MiB"),
    ("<cpu><numa><cell id='0' cpus='0-1' memory='1' unit='GiB'/></numa></cpu>"
     "<numatune><memory mode='strict' nodeset='0'/></numatune>",
     "<numatune><memory mode='strict' nodeset='0'> would keep QEMU off host node 1 chosen for guest cell 0"),
    ("<cpu><numa><cell id='0' cpus='0-1' memory='1' unit='GiB'/></numa></cpu>"
     "<numatune><memory mode='strict' placement='auto'/></numatune>", "placement='auto'"),
])
def test_refused_rewrite_leaves_the_tree_untouched(body, words):
    data = f"<domain><name>web01</name><memory unit='GiB'>1</memory>{body}</domain>".encode()
    tree = domxml.parse(data)
    before = domxml.serialize(tree)
    with pytest.raises(DomainXMLError) as err:
        domxml.rewrite(tree, {0: 1}, 2 * MiB)
    assert words in err.value.line()
    assert err.value.line().startswith("dmem-libvirt: web01: ")
    assert domxml.serialize(tree) == before


@pytest.mark.parametrize("placement", [{}, {0: 0, 1: 1}, {1: 0}])
def test_placement_must_name_exactly_the_guest_cells(placement):
    tree = domxml.parse(PLAIN)
    with pytest.raises(DomainXMLError, match="placement names cells"):
        domxml.rewrite(tree, placement, 2 * MiB)
    assert not domxml.is_ours(tree)


def test_numatune_memory_covering_the_chosen_nodes_is_kept():
    data = (b"<domain><name>w</name><memory unit='GiB'>2</memory>"
            b"<cpu><numa><cell id='0' cpus='0' memory='1' unit='GiB'/>"
            b"<cell id='1' cpus='1' memory='1' unit='GiB'/>"
            b"</numa></cpu><numatune><memory mode='strict' nodeset='0-1'/></numatune></domain>")
    out = rewritten_text(data, {0: 1, 1: 0})
    assert (b'<numatune><memory mode="strict" nodeset="0-1"/><memnode cellid="0" mode="strict" nodeset="1"/>'
            b'<memnode cellid="1" mode="strict" nodeset="0"/></numatune>') in out


def test_cellless_numatune_placement_auto_becomes_strict_on_the_chosen_node():
    data = (b"<domain><name>w</name><memory unit='GiB'>1</memory>"
            b"<numatune><memory placement='auto'/></numatune></domain>")
    assert b'<numatune><memory mode="strict" nodeset="3"/></numatune>' in rewritten_text(data, {0: 3})


def test_single_line_document_stays_on_one_line_and_undo_is_exact():
    out = rewritten_text(PLAIN, {0: 0})
    assert out.count(b"\n") == 1
    tree = domxml.parse(out)
    assert domxml.undo(tree)
    assert domxml.canonical(tree) == domxml.canonical(PLAIN)


@pytest.mark.parametrize("metadata", ["<metadata/>", "<metadata>\n  </metadata>"])
def test_empty_metadata_and_memory_backing_come_back_as_they_were(metadata):
    data = (f"<domain>\n  <name>w</name>\n  {metadata}\n  <memory>1048576</memory>\n"
            "  <memoryBacking/>\n</domain>\n").encode()
    tree = domxml.parse(data)
    domxml.rewrite(tree, {0: 0}, 2 * MiB)
    assert domxml.undo(tree)
    assert domxml.serialize(tree) == data


def test_undo_keeps_metadata_that_other_tools_added_after_the_rewrite():
    tree = domxml.parse((DATA / "two-cells-out.xml").read_bytes())
    metadata = tree.getroot().find("metadata")
    assert metadata is not None
    other = metadata.makeelement("{http://example.org/other}tag", nsmap={"o": "http://example.org/other"})
    metadata.insert(0, other)
    assert domxml.undo(tree)
    assert tree.getroot().find("metadata/{http://example.org/other}tag") is not None
    assert tree.getroot().find("memoryBacking") is None


def test_undo_of_a_domain_that_is_not_ours_changes_nothing():
    tree = domxml.parse((DATA / "two-cells-in.xml").read_bytes())
    assert domxml.undo(tree) is False
    assert domxml.serialize(tree) == (DATA / "two-cells-in.xml").read_bytes()


def test_damaged_undo_record_is_refused_and_the_tree_kept():
    out = (DATA / "existing-numatune-out.xml").read_bytes()
    damaged = out.replace(b"&lt;numatune&gt;", b"&lt;numatun&gt;", 1)
    tree = domxml.parse(damaged)
    with pytest.raises(DomainXMLError, match=r"^dmem-libvirt: tuned04: dmem metadata's original <numatune>"):
        domxml.undo(tree)
    assert domxml.serialize(tree) == damaged


def test_undo_record_smuggling_entities_is_refused():
    out = (DATA / "existing-numatune-out.xml").read_bytes()
    smuggled = b"&lt;!DOCTYPE numatune [&lt;!ENTITY x 'y'&gt;]&gt;&lt;numatune&gt;"
    hostile = out.replace(b"&lt;numatune&gt;", smuggled, 1)
    with pytest.raises(DomainXMLError, match="DOCTYPE"):
        domxml.undo(domxml.parse(hostile))


def test_rewrite_with_another_page_size_starts_from_the_original_sizes():
    tree = domxml.parse((DATA / "rounding-out.xml").read_bytes())
    domxml.rewrite(tree, {0: 0, 1: 1}, 4096, round_up=True)
    dom = read_domain(tree.getroot())
    assert [cell.size for cell in dom.cells] == [1025 * MiB, 1048580 * 1024]
    assert dom.metadata is not None and dom.metadata.page_size == 4096
    assert domxml.undo(tree)
    assert domxml.canonical(tree) == domxml.canonical((DATA / "rounding-in.xml").read_bytes())


def test_retarget_moves_only_node_numbers():
    out = (DATA / "four-cells-out.xml").read_bytes()
    tree = domxml.parse(out)
    assert domxml.retarget(tree, {0: 0, 1: 1, 2: 2, 3: 3}) is False
    assert domxml.retarget(tree, {0: 1, 1: 1, 2: 2, 3: 3}) is True
    moved = domxml.serialize(tree)
    assert b'<memnode cellid="0" mode="strict" nodeset="1"/>' in moved
    assert b'<dmem:cell id="0" node="1"' in moved
    back = moved.replace(b'<memnode cellid="0" mode="strict" nodeset="1"/>',
                         b'<memnode cellid="0" mode="strict" nodeset="0"/>')
    assert back.replace(b'<dmem:cell id="0" node="1"', b'<dmem:cell id="0" node="0"') == out


def test_retarget_refuses_a_placement_for_other_cells_and_ignores_foreign_domains():
    with pytest.raises(DomainXMLError, match="placement names cells 0 but dmem metadata has 0,1"):
        domxml.retarget(domxml.parse((DATA / "two-cells-out.xml").read_bytes()), {0: 1})
    assert domxml.retarget(domxml.parse((DATA / "two-cells-in.xml").read_bytes()), {0: 1}) is False


def test_serialize_keeps_declaration_presence_and_encoding():
    plain = PLAIN.replace(b"'", b'"')
    assert domxml.serialize(domxml.parse(plain)) == plain + b"\n"
    latin = "<?xml version='1.0' encoding='ISO-8859-1'?>\n<domain><name>é</name><memory>1</memory></domain>"
    out = domxml.serialize(domxml.parse(latin.encode("latin-1")))
    assert out == (b'<?xml version="1.0" encoding="ISO-8859-1"?>\n'
                   b"<domain><name>\xe9</name><memory>1</memory></domain>\n")


def test_canonical_form_ignores_quoting_and_attribute_order_but_not_comments():
    a = b"<domain><name a='1' b='2'>x</name><!-- c --><memory>1</memory></domain>"
    b = b'<domain><name b="2" a="1">x</name><!-- c --><memory>1</memory></domain>'
    assert domxml.canonical(a) == domxml.canonical(b) == domxml.canonical(domxml.parse(a))
    assert domxml.canonical(a) != domxml.canonical(a.replace(b"<!-- c -->", b""))


def test_rewritten_domain_survives_libvirts_own_formatting():
    libvirt_original = libvirt_formatted((DATA / "comments-indent-in.xml").read_text())
    tree = domxml.parse(libvirt_original)
    domxml.rewrite(tree, {0: 0, 1: 1}, 2 * MiB)
    dumped = domxml.parse(libvirt_formatted(domxml.serialize(tree).decode()))
    assert read_domain(dumped.getroot()) == read_domain(tree.getroot())
    assert domxml.undo(dumped)
    assert domxml.canonical(dumped) == domxml.canonical(libvirt_original)
