"""Golden files: tests/data/rewrite/<case>-in.xml rewritten with the placement below must give <case>-out.xml.

`pytest --regenerate-goldens` rewrites the -out files (review them with git diff).  Every -out file must be
valid libvirt domain XML, rewriting it again must change nothing, and undo must give back the input.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree

from dmem_libvirt import domxml
from dmem_libvirt.domain import read_domain

DATA = Path(__file__).parent / "data" / "rewrite"
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    placement: dict[int, int]
    page_size: int = 2 * MiB
    round_up: bool = False
    warnings: tuple[str, ...] = ()
    other_placement: dict[int, int] = field(default_factory=dict)
    # The input of an already-rewritten case is itself an -out file; undo goes back to this input.
    original: str | None = None


CASES = {
    "cellless": Case({0: 1}, other_placement={0: 0}),
    "two-cells": Case({0: 0, 1: 1}, other_placement={0: 1, 1: 0}),
    "four-cells": Case({0: 0, 1: 1, 2: 2, 3: 3}, page_size=4096, other_placement={0: 3, 1: 2, 2: 1, 3: 0}),
    "pinned-vcpus": Case({0: 0, 1: 1}, other_placement={0: 1, 1: 1}),
    "existing-numatune": Case({0: 1, 1: 0}, other_placement={0: 0, 1: 1}),
    "foreign-metadata": Case({0: 1}, other_placement={0: 0}),
    "comments-indent": Case({0: 0, 1: 1}, other_placement={0: 1, 1: 0}, warnings=(
        "<memoryBacking><discard/> frees nothing on dmemfs (no hole punching)",
        "guest cell 1 discard='yes' frees nothing on dmemfs (no hole punching)",
        "memballoon freePageReporting frees nothing on dmemfs (no hole punching)",
    )),
    "vfio-hostdev": Case({0: 1}, other_placement={0: 0}),
    "rounding": Case({0: 0, 1: 1}, round_up=True, other_placement={0: 1, 1: 1}),
    "file-backed": Case({0: 1}, other_placement={0: 0}),
    "already-rewritten": Case({0: 0, 1: 1}, other_placement={0: 1, 1: 0}, original="pinned-vcpus"),
}
OWNED = ("memoryBacking", "numatune", "metadata", "cpu/numa")


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def rewritten(case: str) -> tuple[bytes, list[str]]:
    spec = CASES[case]
    tree = domxml.parse(read(f"{case}-in.xml"))
    warnings = domxml.rewrite(tree, spec.placement, spec.page_size, round_up=spec.round_up)
    return domxml.serialize(tree), warnings


def strip_owned(data: bytes, extra: tuple[str, ...] = ()) -> etree._ElementTree:
    """The document without what the rewrite owns; each element's tail goes back to what preceded it."""
    tree = domxml.parse(data)
    for path in OWNED + extra:
        for element in tree.getroot().findall(path):
            domxml.remove_element(element)
    return tree


def without_node_numbers(data: bytes) -> str:
    return re.sub(r'(nodeset|node)="[0-9]+"', r'\1="N"', data.decode())


def test_every_input_has_a_case_and_every_case_an_input():
    inputs = {path.name.removesuffix("-in.xml") for path in DATA.glob("*-in.xml")}
    assert inputs == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_gives_the_golden_output(case, regenerate_goldens):
    output, warnings = rewritten(case)
    golden = DATA / f"{case}-out.xml"
    if regenerate_goldens:
        golden.write_bytes(output)
    assert output.decode() == golden.read_text()
    assert warnings == list(CASES[case].warnings)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_output_is_valid_libvirt_domain_xml(case):
    validator = shutil.which("virt-xml-validate")
    if validator is None or shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate or xmllint is missing: apt-get install libvirt-clients libxml2-utils")
    result = subprocess.run([validator, str(DATA / f"{case}-out.xml"), "domain"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewriting_the_output_again_changes_nothing(case):
    spec = CASES[case]
    output = read(f"{case}-out.xml")
    tree = domxml.parse(output)
    domxml.rewrite(tree, spec.placement, spec.page_size, round_up=spec.round_up)
    assert domxml.serialize(tree) == output


def test_already_rewritten_input_is_left_byte_identical():
    assert read("already-rewritten-out.xml") == read("already-rewritten-in.xml")


@pytest.mark.parametrize("case", sorted(CASES))
def test_undo_gives_back_the_original_domain(case):
    spec = CASES[case]
    tree = domxml.parse(read(f"{case}-out.xml"))
    assert domxml.undo(tree) is True
    original = read(f"{spec.original or case}-in.xml")
    assert domxml.canonical(tree) == domxml.canonical(original)
    assert not domxml.is_ours(tree)


@pytest.mark.parametrize("case", sorted(CASES))
def test_everything_the_rewrite_does_not_own_is_unchanged_under_c14n(case):
    extra = ("memory", "currentMemory") if CASES[case].round_up else ()
    before = strip_owned(read(f"{case}-in.xml"), extra)
    after = strip_owned(read(f"{case}-out.xml"), extra)
    assert domxml.canonical(after) == domxml.canonical(before)


def test_round_trip_golden_is_byte_identical_outside_owned_elements():
    source = read("comments-indent-in.xml")
    assert domxml.serialize(domxml.parse(source)) == source
    before = domxml.serialize(strip_owned(source))
    after = domxml.serialize(strip_owned(read("comments-indent-out.xml")))
    assert after == before
    assert b"<!-- hand-written guest: keep these comments -->\n<domain" in after
    assert b"\t   <!-- no KSM: tenants must not share pages -->" in read("comments-indent-out.xml")


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_placement_changes_only_node_numbers(case):
    spec = CASES[case]
    tree = domxml.parse(read(f"{case}-out.xml"))
    domxml.rewrite(tree, spec.other_placement, spec.page_size, round_up=spec.round_up)
    moved = domxml.serialize(tree)
    assert moved != read(f"{case}-out.xml")
    assert without_node_numbers(moved) == without_node_numbers(read(f"{case}-out.xml"))
    retargeted = domxml.parse(read(f"{case}-out.xml"))
    assert domxml.retarget(retargeted, spec.other_placement) is True
    assert domxml.serialize(retargeted) == moved


@pytest.mark.parametrize("name", sorted(f"{case}-{side}.xml" for case in CASES for side in ("in", "out")))
def test_stdlib_and_lxml_read_the_same_domain(name):
    data = read(name)
    assert read_domain(ET.fromstring(data)) == read_domain(domxml.parse(data).getroot())
