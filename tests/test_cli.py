"""The `dmem-libvirt` command, driven in-process against libvirt's test:///default driver and fake hosts.

Every refusal must reach the user as exactly one stderr line ``dmem-libvirt: <domain>: ...`` with exit 1,
leave stdout empty and leave the libvirt definition untouched; usage errors exit 2.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from fakehost import FakeNode, make_host
from lxml import etree
from pytest_mock import MockerFixture

from dmem_libvirt import cli
from dmem_libvirt.ledger import Reservation
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, MiB

NS = "http://dmem-libvirt.org/xmlns/domain/1"
INACTIVE_SECURE = 3  # VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE

TWO_CELLS = """<domain type='kvm'>
  <name>web01</name>
  <uuid>6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7a01</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu>
    <numa>
      <cell id='0' cpus='0' memory='1' unit='GiB'/>
      <cell id='1' cpus='1' memory='1' unit='GiB'/>
    </numa>
  </cpu>
  <devices><memballoon model='none'/></devices>
</domain>
"""

NO_CELLS = """<domain type='kvm'>
  <!-- a comment the rewrite must keep -->
  <name>small</name>
  <uuid>6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7a02</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
</domain>
"""


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def run(argv: list[str], conn: object = None, stdin: bytes = b"") -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, conn, stdin=io.BytesIO(stdin), stdout=out, stderr=err)  # type: ignore[arg-type]
    return Result(code, out.getvalue(), err.getvalue())


def assert_refused(result: Result, domain: str | None = None) -> str:
    """Exit 1, nothing on stdout, one line on stderr in the contract's format; returns the line."""
    assert result.code == 1, result
    assert result.out == ""
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    prefix = f"dmem-libvirt: {domain}: " if domain else "dmem-libvirt: "
    assert line.startswith(prefix), line
    return line


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    """A two-node fake host, 8 GiB of 2 MiB dmem pages on each node."""
    make_host(tmp_path / "host", nodes=2)
    return str(tmp_path / "host" / "config.toml")


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    # test:///default keeps its state until the last connection closes: every test starts afresh.
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()


@pytest.fixture
def web01(conn: libvirt.virConnect) -> str:
    conn.defineXML(TWO_CELLS)
    return "web01"


def defined(conn: libvirt.virConnect, name: str) -> str:
    return str(conn.lookupByName(name).XMLDesc(INACTIVE_SECURE))


def dmem_cells(xml: str) -> dict[int, int]:
    """Guest cell -> host node as the dmem metadata of a definition records it."""
    root = etree.fromstring(xml.encode())
    cells = root.iterfind(f"metadata/{{{NS}}}memory/{{{NS}}}cell")
    return {int(cell.get("id", "")): int(cell.get("node", "")) for cell in cells}


def attr(root: etree._Element, path: str, name: str) -> str | None:
    element = root.find(path)
    assert element is not None, f"no <{path}> in the definition"
    return element.get(name)


# ---- plan / enable / disable ---------------------------------------------------------------------


def test_plan_prints_placement_in_binary_units_and_a_diff_but_defines_nothing(
        config_file: str, conn: libvirt.virConnect, web01: str) -> None:
    before = defined(conn, web01)
    result = run(["--config", config_file, "plan", web01], conn)
    assert result.code == 0, result.err
    assert "web01: 2 MiB dmem pages" in result.out
    assert "   0      1.0 GiB     0      8.0 GiB  -" in result.out
    assert "   1      1.0 GiB     0      8.0 GiB  -" in result.out
    assert "+    <memnode cellid=\"1\" mode=\"strict\" nodeset=\"0\"/>" in result.out
    # Only what the rewrite adds shows in the diff, not libvirt's quoting style.
    assert "-  <vcpu" not in result.out
    assert defined(conn, web01) == before


def test_enable_defines_file_backed_shared_ram_bound_to_one_node_per_cell(
        config_file: str, conn: libvirt.virConnect, web01: str) -> None:
    result = run(["--config", config_file, "enable", web01, "--nodes", "1,0"], conn)
    assert result.code == 0, result.err
    assert result.out == ("web01: enabled on 2 MiB dmem pages (cell 0 1.0 GiB -> node 1, "
                          "cell 1 1.0 GiB -> node 0)\n")
    xml = defined(conn, web01)
    root = etree.fromstring(xml.encode())
    assert attr(root, "memoryBacking/source", "type") == "file"
    assert attr(root, "memoryBacking/access", "mode") == "shared"
    assert attr(root, "memoryBacking/allocation", "mode") == "immediate"
    assert [(m.get("cellid"), m.get("mode"), m.get("nodeset")) for m in root.iterfind("numatune/memnode")] == [
        ("0", "strict", "1"), ("1", "strict", "0")]
    assert dmem_cells(xml) == {0: 1, 1: 0}


def test_enable_twice_keeps_the_placement_and_says_so(config_file: str, conn: libvirt.virConnect,
                                                      web01: str) -> None:
    assert run(["--config", config_file, "enable", web01, "--nodes", "1"], conn).code == 0
    first = defined(conn, web01)
    again = run(["--config", config_file, "enable", web01], conn)
    assert again.code == 0, again.err
    assert again.out.startswith("web01: already enabled (cell 0 1.0 GiB -> node 1, cell 1 1.0 GiB -> node 1)")
    assert defined(conn, web01) == first


def test_enable_of_a_guest_without_cells_binds_its_memory_to_one_node(config_file: str,
                                                                      conn: libvirt.virConnect) -> None:
    conn.defineXML(NO_CELLS)
    result = run(["--config", config_file, "enable", "small"], conn)
    assert result.code == 0, result.err
    root = etree.fromstring(defined(conn, "small").encode())
    assert root.find("cpu/numa") is None
    assert attr(root, "numatune/memory", "nodeset") in ("0", "1")
    assert attr(root, "numatune/memory", "mode") == "strict"


def test_disable_restores_the_original_definition_equal_under_canonical_xml(
        config_file: str, conn: libvirt.virConnect, web01: str) -> None:
    original = defined(conn, web01)
    assert run(["--config", config_file, "enable", web01], conn).code == 0
    assert defined(conn, web01) != original
    result = run(["--config", config_file, "disable", web01], conn)
    assert result.code == 0, result.err
    assert result.out == "web01: disabled, original memory definition restored\n"
    assert etree.canonicalize(defined(conn, web01)) == etree.canonicalize(original)


def test_disable_of_a_guest_never_enabled_changes_nothing(config_file: str, conn: libvirt.virConnect,
                                                          web01: str) -> None:
    before = defined(conn, web01)
    result = run(["--config", config_file, "disable", web01], conn)
    assert result == Result(0, "web01: not enabled, nothing to do\n", "")
    assert defined(conn, web01) == before


def test_enable_of_a_guest_larger_than_any_node_is_refused_with_domain_node_and_sizes(
        config_file: str, conn: libvirt.virConnect) -> None:
    conn.defineXML(NO_CELLS.replace("<memory unit='MiB'>256", "<memory unit='GiB'>12"))
    before = defined(conn, "small")
    line = assert_refused(run(["--config", config_file, "enable", "small"], conn), "small")
    assert "12.0 GiB" in line and "2 MiB" in line
    assert "node 0: 8.0 GiB free" in line and "node 1: 8.0 GiB free" in line
    assert defined(conn, "small") == before


def test_enable_on_a_full_node_names_the_domain_holding_it(tmp_path: Path, conn: libvirt.virConnect,
                                                           web01: str) -> None:
    config = make_host(tmp_path / "host", nodes=[FakeNode(cpus="0", dmem_total=2 * GiB),
                                                 FakeNode(cpus="1", dmem_total=2 * GiB)])
    with HookContext.create(config).ledger.transaction() as book:
        book.add(Reservation(domain="db02", uuid="6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7aff", node=1,
                             bytes=1536 * MiB, page_size=2 * MiB, backend="dmemfs", file="pc.ram",
                             state="reserved", origin="prepare", created=0.0))
    before = defined(conn, web01)
    line = assert_refused(run(["--config", str(config.source), "enable", web01, "--nodes", "0,1"], conn), web01)
    assert "host node 1" in line and "1.0 GiB" in line and "1.5 GiB reserved by db02" in line, line
    assert defined(conn, web01) == before


def test_enable_of_an_unknown_domain_names_it(config_file: str, conn: libvirt.virConnect) -> None:
    line = assert_refused(run(["--config", config_file, "enable", "ghost"], conn), "ghost")
    assert "no such domain" in line


def test_refused_connection_is_one_line_naming_the_domain_and_defines_nothing(
        config_file: str, conn: libvirt.virConnect, web01: str, mocker: MockerFixture) -> None:
    before = defined(conn, web01)
    opened = mocker.patch("libvirt.open", side_effect=libvirt.libvirtError(
        "Failed to connect socket to '/run/libvirt/libvirt-sock': Connection refused"))
    line = assert_refused(run(["--config", config_file, "enable", web01, "-c", "qemu:///system"]), web01)
    opened.assert_called_once_with("qemu:///system")
    assert "cannot connect to libvirt at qemu:///system" in line and "Connection refused" in line
    assert defined(conn, web01) == before


def test_definition_rejected_by_libvirt_is_one_line_and_leaves_the_domain_as_it_was(
        config_file: str, conn: libvirt.virConnect, web01: str, mocker: MockerFixture) -> None:
    before = defined(conn, web01)
    mocker.patch.object(conn, "defineXML", side_effect=libvirt.libvirtError(
        "XML error: Invalid value for attribute 'mode'\nin element 'access'"))
    line = assert_refused(run(["--config", config_file, "enable", web01], conn), web01)
    assert line == ("dmem-libvirt: web01: libvirt refused the new definition: "
                    "XML error: Invalid value for attribute 'mode' in element 'access'")
    assert defined(conn, web01) == before


# ---- status ----------------------------------------------------------------------------------------


def test_status_json_lists_reservations_with_domain_node_bytes_and_state(
        config_file: str, conn: libvirt.virConnect, web01: str) -> None:
    import json

    from dmem_libvirt import config as config_mod
    from dmem_libvirt import lifecycle
    from dmem_libvirt.domain import read_domain

    assert run(["--config", config_file, "enable", web01, "--nodes", "0,1"], conn).code == 0
    config = config_mod.load(config_file)
    ctx = HookContext.create(config)
    # What the hook's `prepare begin` does for this definition.
    lifecycle.prepare(ctx, web01, read_domain(etree.fromstring(defined(conn, web01).encode())))
    with ctx.ledger.transaction() as book:
        book.add(Reservation(domain="db02", uuid="6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7aff", node=1,
                             bytes=512 * MiB, page_size=2 * MiB, backend="dmemfs", file="pc.ram",
                             state="pinned", origin="prepare", created=0.0, path="/x/pc.ram", inode=7, pid=4321))
    result = run(["status", "--json", "--config", config_file])
    assert result.code == 0, result.err
    data = json.loads(result.out)
    got = sorted((r["domain"], r["uuid"], r["node"], r["bytes"], r["state"]) for r in data["reservations"])
    uuid = "6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7a01"
    assert got == [("db02", "6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7aff", 1, 512 * MiB, "pinned"),
                   ("web01", uuid, 0, GiB, "reserved"), ("web01", uuid, 1, GiB, "reserved")]
    pools = {pool["node"]: pool for pool in data["pools"]}
    assert (pools[1]["reserved"], pools[1]["pinned"], pools[1]["total"]) == (GiB, 512 * MiB, 8 * GiB)


def test_status_table_prints_sizes_in_binary_units(config_file: str) -> None:
    result = run(["--config", config_file, "status"])
    assert result.code == 0, result.err
    assert "   0      8.0 GiB      8.0 GiB          0 B          0 B" in result.out
    assert "no domain holds reserved memory" in result.out
    assert "struct page memory saved: 256.0 MiB" in result.out


def test_status_without_dmem_statistics_says_what_to_mount(tmp_path: Path) -> None:
    config = make_host(tmp_path / "host", nodes=1, debugfs=False, page_size=2 * MiB)
    line = assert_refused(run(["--config", str(config.source), "status"]))
    assert "no dmem statistics" in line and "[dmemfs.capacity]" in line


# ---- rewrite (offline) -------------------------------------------------------------------------------


@pytest.mark.parametrize("before", [True, False], ids=["config-before-command", "config-after-command"])
def test_rewrite_reads_stdin_and_writes_the_rewritten_domain_to_stdout(config_file: str, before: bool) -> None:
    argv = ["--config", config_file, "rewrite", "--nodes", "1"] if before else [
        "rewrite", "--nodes", "1", "--config", config_file]
    result = run(argv, stdin=NO_CELLS.encode())
    assert result.code == 0, result.err
    assert result.err == ""
    root = etree.fromstring(result.out.encode())
    assert attr(root, "numatune/memory", "nodeset") == "1"
    assert dmem_cells(result.out) == {0: 1}
    assert "<!-- a comment the rewrite must keep -->" in result.out


def test_rewrite_output_is_valid_libvirt_domain_xml(config_file: str, tmp_path: Path) -> None:
    result = run(["rewrite", "--config", config_file], stdin=TWO_CELLS.encode())
    assert result.code == 0, result.err
    out = tmp_path / "out.xml"
    out.write_text(result.out)
    try:
        check = subprocess.run(["virt-xml-validate", str(out), "domain"], capture_output=True, text=True,
                               timeout=60, check=False)
    except FileNotFoundError:
        pytest.fail("virt-xml-validate is missing: apt-get install libvirt-clients libxml2-utils")
    assert check.returncode == 0, check.stdout + check.stderr


def test_rewrite_is_idempotent(config_file: str) -> None:
    once = run(["rewrite", "--config", config_file], stdin=TWO_CELLS.encode())
    twice = run(["rewrite", "--config", config_file], stdin=once.out.encode())
    assert twice.code == 0, twice.err
    assert twice.out == once.out


def test_rewrite_rounds_up_only_when_asked(config_file: str) -> None:
    odd = NO_CELLS.replace("<memory unit='MiB'>256", "<memory unit='MiB'>255").encode()
    line = assert_refused(run(["rewrite", "--config", config_file], stdin=odd), "small")
    assert "255 MiB" in line and "254 MiB or 256 MiB" in line and "--round" in line
    rounded = run(["rewrite", "--round", "--config", config_file], stdin=odd)
    assert rounded.code == 0, rounded.err
    cell = attr(etree.fromstring(rounded.out.encode()), f"metadata/{{{NS}}}memory/{{{NS}}}cell", "bytes")
    assert cell == str(256 * MiB)


def test_rewrite_without_pool_data_needs_the_nodes_and_then_works_offline(tmp_path: Path) -> None:
    config = make_host(tmp_path / "host", nodes=2, debugfs=False, page_size=2 * MiB)
    line = assert_refused(run(["rewrite", "--config", str(config.source)], stdin=NO_CELLS.encode()), "small")
    assert "no dmem statistics" in line and line.endswith("or give the host nodes with --nodes")
    result = run(["rewrite", "--config", str(config.source), "--nodes", "0"], stdin=NO_CELLS.encode())
    assert result.code == 0, result.err
    assert dmem_cells(result.out) == {0: 0}


def test_rewrite_without_a_page_size_names_the_flag_and_then_works_offline(tmp_path: Path) -> None:
    config = make_host(tmp_path / "host", nodes=2, debugfs=False, page_shift=None)
    argv = ["rewrite", "--config", str(config.source), "--nodes", "0"]
    line = assert_refused(run(argv, stdin=NO_CELLS.encode()), "small")
    assert "cannot tell the dmem page size" in line and line.endswith("or give the page size with --page-size")
    result = run([*argv, "--page-size", "2M"], stdin=NO_CELLS.encode())
    assert result.code == 0, result.err
    assert dmem_cells(result.out) == {0: 0}


def test_plan_and_enable_take_a_page_size(config_file: str, conn: libvirt.virConnect, web01: str) -> None:
    result = run(["--config", config_file, "plan", web01, "--page-size", "4K"], conn)
    assert result.code == 0, result.err
    assert result.out.startswith("web01: 4 KiB dmem pages\n")
    result = run(["--config", config_file, "enable", web01, "--page-size", "4K"], conn)
    assert result.code == 0, result.err
    assert "enabled on 4 KiB dmem pages" in result.out


def test_rewrite_onto_a_node_without_dmem_names_the_nodes_that_have_it(config_file: str) -> None:
    line = assert_refused(run(["rewrite", "--config", config_file, "--nodes", "5"], stdin=NO_CELLS.encode()),
                          "small")
    assert "host node 5" in line and "0, 1" in line


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    line = assert_refused(run(["rewrite", "--config", str(tmp_path / "nope.toml")], stdin=NO_CELLS.encode()))
    assert f"{tmp_path / 'nope.toml'} does not exist" in line


def test_config_comes_from_the_environment_when_not_given(config_file: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMEM_LIBVIRT_CONFIG", config_file)
    result = run(["status"])
    assert result.code == 0, result.err
    assert str(Path(config_file).parent / "dmem") in result.out


# ---- hostile input ---------------------------------------------------------------------------------


LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE domain [\n <!ENTITY a "lollollollollollollollollollol">\n'
          + "".join(f' <!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">\n' for i in range(9))
          + ']>\n<domain type="kvm"><name>laughs</name><memory unit="MiB">256</memory>'
          '<description>&j;</description></domain>\n')


class Tripwire:
    """A FIFO that records whether anything opened it for reading (a parser fetching an external resource)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader has it open
                self._stop.wait(0.002)
                continue
            self.opened.set()
            try:
                os.write(fd, b"root:x:0:0:SECRET-FROM-TRIPWIRE\n")
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
            return

    def __enter__(self) -> Tripwire:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def hostile_documents(tmp_path: Path) -> dict[str, bytes]:
    secret = tmp_path / "secret"
    external = (f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
                '<domain type="kvm"><name>xxe</name><memory unit="MiB">256</memory>'
                "<description>&xxe;</description></domain>\n")
    dtd = (f'<!DOCTYPE domain SYSTEM "file://{secret}">\n'
           '<domain type="kvm"><name>dtd</name><memory unit="MiB">256</memory></domain>\n')
    passwd = ('<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
              '<domain type="kvm"><name>passwd</name><memory unit="MiB">256</memory>'
              "<description>&xxe;</description></domain>\n")
    utf16 = '<?xml version="1.0" encoding="UTF-16"?>\n'
    return {
        "billion-laughs": LAUGHS.encode(),
        # In UTF-16 the declarations are not visible as ASCII bytes: the parsed document must be refused.
        "billion-laughs-utf16": LAUGHS.replace('<?xml version="1.0"?>\n', utf16).encode("utf-16"),
        "external-entity": external.encode(),
        "external-entity-utf16": (utf16 + external).encode("utf-16"),
        "external-dtd": dtd.encode(),
        "external-dtd-utf16": (utf16 + dtd).encode("utf-16"),
        "etc-passwd-utf16": (utf16 + passwd).encode("utf-16"),
        "50-MB": (b'<domain type="kvm"><name>huge</name><memory unit="MiB">256</memory><description>'
                  + b"A" * (50 * 1024 * 1024) + b"</description></domain>"),
        "wrong-root": b'<network><name>net</name><memory unit="MiB">256</memory></network>',
        "missing-memory": b'<domain type="kvm"><name>nomem</name><vcpu>1</vcpu></domain>',
        "not-xml": b"name: web01\nmemory: 256M\n",
        "truncated": TWO_CELLS[:200].encode(),
        "empty": b"",
        "binary": bytes(range(256)),
    }


HOSTILE = ["billion-laughs", "billion-laughs-utf16", "external-entity", "external-entity-utf16", "external-dtd",
           "external-dtd-utf16", "etc-passwd-utf16", "50-MB", "wrong-root", "missing-memory", "not-xml",
           "truncated", "empty", "binary"]
EXPECTED = {
    "billion-laughs": "DOCTYPE or entity declarations", "billion-laughs-utf16": "domain XML",
    "external-entity": "DOCTYPE or entity declarations", "external-entity-utf16": "DOCTYPE or entity declarations",
    "external-dtd": "DOCTYPE or entity declarations", "external-dtd-utf16": "DOCTYPE or entity declarations",
    "etc-passwd-utf16": "DOCTYPE or entity declarations", "50-MB": "refusing more than 10.0 MiB",
    "wrong-root": "root element <network>, not <domain>", "missing-memory": "nomem: domain XML has no <memory>",
    "not-xml": "not well-formed XML", "truncated": "not well-formed XML", "empty": "domain XML is empty",
    "binary": "domain XML",
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_xml_on_rewrite_is_refused_in_one_line_without_reading_external_files(
        config_file: str, tmp_path: Path, case: str) -> None:
    document = hostile_documents(tmp_path)[case]
    with Tripwire(tmp_path / "secret") as tripwire:
        result = run(["rewrite", "--config", config_file, "--nodes", "0"], stdin=document)
    line = assert_refused(result)
    assert EXPECTED[case] in line
    assert not tripwire.opened.is_set(), "the parser opened the external resource"
    assert "SECRET" not in line and "root:x:0" not in line and "lol" not in line
    assert len(line) < 300


@pytest.mark.parametrize("case", ["billion-laughs", "external-entity-utf16", "wrong-root", "not-xml"])
def test_hostile_xml_from_libvirt_is_refused_by_enable_and_nothing_is_defined(
        config_file: str, conn: libvirt.virConnect, web01: str, tmp_path: Path, mocker: MockerFixture,
        case: str) -> None:
    before = defined(conn, web01)
    document = hostile_documents(tmp_path)[case]
    handle = mocker.MagicMock()
    handle.XMLDesc.return_value = document.decode("utf-16" if case.endswith("utf16") else "utf-8")
    handle.isActive.return_value = 0
    handle.name.return_value = web01
    mocker.patch.object(conn, "lookupByName", return_value=handle)
    define = mocker.patch.object(conn, "defineXML")
    with Tripwire(tmp_path / "secret") as tripwire:
        result = run(["--config", config_file, "enable", web01], conn)
    assert_refused(result)
    define.assert_not_called()
    assert not tripwire.opened.is_set()
    mocker.stopall()
    assert defined(conn, web01) == before


# ---- usage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["enable"], ["plan"], ["rewrite", "--nodes", "a,b"], ["rewrite", "--nodes", "-1"],
    ["rewrite", "--page-size", "huge"], ["status", "--bogus"], ["--config"],
], ids=lambda argv: " ".join(argv) or "no-arguments")
def test_usage_errors_exit_2_with_usage_on_stderr(argv: list[str], config_file: str) -> None:
    result = run(argv)
    assert result.code == 2
    assert result.out == ""
    assert "usage: dmem-libvirt" in result.err


def test_help_goes_to_stdout_and_exits_0() -> None:
    result = run(["--help"])
    assert result.code == 0
    assert result.err == ""
    for name, (text, _) in cli.COMMAND_HELP.items():
        assert name in result.out
        assert " ".join(text.split()[:3]) in " ".join(result.out.split())


@pytest.mark.parametrize("name", sorted(cli.COMMAND_HELP))
def test_every_command_has_a_description_and_an_example_in_its_help(name: str) -> None:
    result = run([name, "--help"])
    assert (result.code, result.err) == (0, "")
    text, example = cli.COMMAND_HELP[name]
    usage, description, *_ = result.out.split("\n\n")
    assert usage.startswith(f"usage: dmem-libvirt {name} ")
    assert description == text
    assert result.out.endswith(f"example:\n  {example}\n")
    assert example.startswith(f"dmem-libvirt {name}")


def test_version_prints_the_package_version() -> None:
    from dmem_libvirt import __version__

    assert run(["--version"]) == Result(0, f"dmem-libvirt {__version__}\n", "")


@pytest.mark.parametrize("name", ["rewrite", "status", "metrics", "install-hook", "uninstall-hook", "reconcile",
                                  "check"])
def test_commands_that_never_connect_to_libvirt_take_no_uri(name: str) -> None:
    result = run([name, "-c", "qemu:///system"])
    assert result.code == 2
    assert "unrecognized arguments: -c" in result.err


def test_a_libvirt_failure_from_the_real_command_is_one_line(config_file: str, tmp_path: Path) -> None:
    # libvirt's own error handler would print "libvirt: XML-RPC error : ..." before our line.
    command = Path(sys.executable).parent / "dmem-libvirt"
    uri = f"qemu:///system?socket={tmp_path / 'no-such-socket'}"
    result = subprocess.run([str(command), "plan", "web01", "--config", config_file, "-c", uri],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"dmem-libvirt: web01: cannot connect to libvirt at {uri}: ")
    assert "no-such-socket" in result.stderr


# ---- the installed command ------------------------------------------------------------------------------


def test_rewrite_keeps_the_documents_own_encoding_on_the_real_stdout(config_file: str) -> None:
    latin1 = ('<?xml version="1.0" encoding="ISO-8859-1"?>\n'
              "<domain type='kvm'><name>caf\xe9</name><memory unit='MiB'>256</memory></domain>\n").encode("latin-1")
    command = Path(sys.executable).parent / "dmem-libvirt"
    result = subprocess.run([str(command), "rewrite", "--config", config_file, "--nodes", "0"], input=latin1,
                            capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b'<?xml version="1.0" encoding="ISO-8859-1"?>\n')
    assert b"<name>caf\xe9</name>" in result.stdout
    assert etree.fromstring(result.stdout).findtext("name") == "caf\xe9"


def test_refusal_from_the_real_command_is_one_line_and_exit_1(config_file: str) -> None:
    command = Path(sys.executable).parent / "dmem-libvirt"
    result = subprocess.run([str(command), "rewrite", "--config", config_file], input=LAUGHS,
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "dmem-libvirt: domain XML has a DOCTYPE or entity declarations; refusing it\n"


def test_an_unexpected_host_file_error_is_still_one_line(config_file: str, mocker: MockerFixture) -> None:
    mocker.patch("dmem_libvirt.status.collect",
                 side_effect=PermissionError(13, "Permission denied", "/var/lib/dmem-libvirt/ledger.json"))
    line = assert_refused(run(["status", "--config", config_file]))
    assert line == "dmem-libvirt: status failed: Permission denied: /var/lib/dmem-libvirt/ledger.json"
