"""Generated libvirt-shaped definitions through `rewrite` and the hook: never a traceback, never exit 2+.

Cells with missing, duplicate or odd ids, CPU lists, sizes and units at the limits, numatune variants, every
<memoryBacking> child, memory devices, and our own metadata with missing, wrong-typed and hostile values.
`rewrite` must exit 0 with well-formed, idempotent XML or exit 1 with one line; the hook must exit 0 or
exit 1 with one line where libvirt lets it refuse, and always 0 where it must never fail.
"""

from __future__ import annotations

import io
from xml.sax.saxutils import quoteattr

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hook import Call, Rig, live

from dmem_libvirt import cli, domxml

NS = "http://dmem-libvirt.org/xmlns/domain/1"
# Each field draws a sane value mostly and an odd one sometimes (hypothesis favours the first choice).
SANE_SIZES = ("4096", "8192", "16384", "2048")
ODD_SIZES = ("0", "1", "1024", "131071", "-1", "1.5", "", " 4096 ", "18446744073709551615",
             "99999999999999999999999", "0x10", "\u0663")
SANE_UNITS = ("KiB", "", "k", "KiB")
ODD_UNITS = ("b", "bytes", "KB", "MiB", "M", "mb", "GiB", "TiB", "EiB", "x", "KiB ")
SANE_CPUS = ("0", "0-1", "1", "0-3,^2")
ODD_CPUS = ("0-3,^2,2", "^2-3", "3-1", "0,,1", "", "a", "0-", " 1 , 3", "0-1023")
NAMES = ("web01", "q'u", 'say "hi"', "a&b", "<x>", "\u00fcn\u00ef", "a" * 60, " spaced ", "tab\tname")
HOSTILE = ("..", "", "a/b", "x" * 300, "-1", "99", "1e3", "4096", "2097152", "abc", "0", "\u202e", "ram-node0")


def pick(draw: st.DrawFn, sane: tuple[str, ...], odd: tuple[str, ...]) -> str:
    if draw(st.integers(0, 5)) < 5:
        return draw(st.sampled_from(sane))
    return draw(st.sampled_from(odd))


def odd(draw: st.DrawFn) -> bool:
    """True now and then: the field is left out or broken."""
    return draw(st.integers(0, 7)) == 7


def _attrs(draw: st.DrawFn, names: tuple[str, ...], values: tuple[str, ...]) -> str:
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    return "".join(f" {name}={quoteattr(draw(st.sampled_from(values)))}" for name in chosen)


@st.composite
def domain_xml(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    parts = ["<domain type='kvm'>", "" if odd(draw) else f"<name>{_escape(name)}</name>"]
    if not odd(draw):
        parts.append("<uuid>6c3a1a4e-0d3b-4a57-9a53-2f0c1c9e7a01</uuid>")
    if odd(draw):
        parts.append(_metadata(draw))
    cells = _cells(draw)
    if not odd(draw):
        unit = pick(draw, SANE_UNITS, ODD_UNITS)
        memory = str(cells[1]) if cells[1] and not odd(draw) else pick(draw, ("16384", "65536"), ODD_SIZES)
        parts.append(f"<memory{f' unit={quoteattr(unit)}' if unit else ''}>{memory}</memory>")
    if odd(draw):
        parts.append(f"<currentMemory unit='KiB'>{pick(draw, SANE_SIZES, ODD_SIZES)}</currentMemory>")
    parts.append(_backing(draw))
    cpuset = pick(draw, ("",), (*SANE_CPUS, *ODD_CPUS))
    count = pick(draw, ("4", "1"), ("0", "x", "999"))
    parts.append(f"<vcpu{f' cpuset={quoteattr(cpuset)}' if cpuset else ''}>{count}</vcpu>")
    if odd(draw):
        pins = draw(st.lists(st.tuples(st.sampled_from(("0", "1", "9", "x")),
                                       st.sampled_from((*SANE_CPUS, *ODD_CPUS))), max_size=3))
        parts.append("<cputune>" + "".join(f"<vcpupin vcpu={quoteattr(v)} cpuset={quoteattr(c)}/>" for v, c in pins)
                     + "</cputune>")
    parts.append(_numatune(draw))
    parts.append("<os><type arch=" + quoteattr(pick(draw, ("x86_64",), ("i686", "aarch64")))
                 + " machine='pc'>hvm</type></os>")
    parts.append(cells[0])
    devices = ["<console type='pty'/>"]
    if odd(draw):
        devices += draw(st.lists(st.sampled_from((
            "<memory model='dimm'><target><size unit='MiB'>128</size></target></memory>",
            "<memballoon model='virtio' freePageReporting='on'/>", "<memballoon model='none'/>")), max_size=3))
    parts.append("<devices>" + "".join(devices) + "</devices>")
    parts.append("</domain>")
    return "\n  ".join(p for p in parts if p).encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cells(draw: st.DrawFn) -> tuple[str, int]:
    """<cpu><numa> and the sum of its sizes in KiB (0 when not all sane)."""
    count = draw(st.integers(0, 4))
    if not count:
        return "", 0
    rows = []
    total = 0
    for index in range(count):
        cell_id = pick(draw, (str(index),), ("0", "7", "-1", "x", "none"))
        attrs = "" if cell_id == "none" else f" id={quoteattr(cell_id)}"
        attrs += "" if odd(draw) else f" cpus={quoteattr(pick(draw, (str(index),), (*SANE_CPUS, *ODD_CPUS)))}"
        size = pick(draw, SANE_SIZES, ODD_SIZES)
        if not odd(draw):
            attrs += f" memory={quoteattr(size)}"
        unit = pick(draw, ("KiB",), ODD_UNITS)
        attrs += f" unit={quoteattr(unit)}"
        attrs += " discard='yes'" if odd(draw) else ""
        rows.append(f"<cell{attrs}/>")
        total += int(size) if size in SANE_SIZES and unit == "KiB" else 0
    return "<cpu><numa>" + "".join(rows) + "</numa></cpu>", total


def _backing(draw: st.DrawFn) -> str:
    children = {
        "hugepages": "<hugepages/>", "nosharepages": "<nosharepages/>", "locked": "<locked/>",
        "source": f"<source type={quoteattr(pick(draw, ('file',), ('memfd', 'anonymous', 'odd')))}/>",
        "access": f"<access mode={quoteattr(pick(draw, ('shared',), ('private', '')))}/>",
        "allocation": f"<allocation mode={quoteattr(pick(draw, ('immediate',), ('ondemand',)))}/>",
        "discard": "<discard/>",
    }
    if not odd(draw):
        return ""
    chosen = draw(st.lists(st.sampled_from(sorted(children)), unique=True, max_size=len(children)))
    return "<memoryBacking>" + "".join(children[c] for c in chosen) + "</memoryBacking>"


def _numatune(draw: st.DrawFn) -> str:
    if not odd(draw):
        return ""
    inner = ""
    if draw(st.booleans()):
        inner += (f"<memory mode={quoteattr(pick(draw, ('strict',), ('preferred', 'interleave', 'restrictive')))}"
                  f" nodeset={quoteattr(pick(draw, ('0',), ODD_CPUS))}/>")
    for cell in draw(st.lists(st.sampled_from(("0", "1", "3", "x")), max_size=3)):
        inner += (f"<memnode cellid={quoteattr(cell)} mode={quoteattr(pick(draw, ('strict',), ('preferred',)))}"
                  f" nodeset={quoteattr(pick(draw, ('0', '1'), ODD_CPUS))}/>")
    return f"<numatune>{inner}</numatune>"


def _metadata(draw: st.DrawFn) -> str:
    memory_attrs = _attrs(draw, ("version", "backend", "page-size", "cellless"),
                          ("1", "1", "dmemfs", "dmemfs", "2097152", "yes", *HOSTILE))
    cells = "".join(
        f"<dmem:cell{_attrs(draw, ('id', 'node', 'bytes', 'file'), ('0', '1', '2097152', '4194304', *HOSTILE))}/>"
        for _ in range(draw(st.integers(0, 3))))
    original = "<dmem:original name='memory'>&lt;memory&gt;1&lt;/memory&gt;</dmem:original>" if draw(
        st.booleans()) else ""
    return f"<metadata><dmem:memory xmlns:dmem='{NS}'{memory_attrs}>{cells}{original}</dmem:memory></metadata>"


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def one_line_or_nothing(code: int, stderr: str, what: str) -> None:
    assert "Traceback" not in stderr and "internal error" not in stderr, f"{what}: {stderr}"
    assert code in (0, 1), f"{what} exited {code}: {stderr}"
    if code:
        assert stderr.count("\n") == 1 and stderr.startswith("dmem-libvirt: "), f"{what}: {stderr!r}"


def rewrite(rig: Rig, xml: bytes, *nodes: str) -> Call:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(rig.config_path), "rewrite", *nodes], stdin=io.BytesIO(xml), stdout=out,
                    stderr=err)
    return Call(code, out.getvalue(), err.getvalue())


def test_generated_definitions_are_rewritten_idempotently_or_refused_in_one_line(rig: Rig) -> None:
    @FUZZ
    @given(domain_xml(), st.sampled_from(((), ("--nodes", "0"), ("--nodes", "1"), ("--nodes", "0,1,0,1"))))
    def check(xml: bytes, nodes: tuple[str, ...]) -> None:
        first = rewrite(rig, xml, *nodes)
        one_line_or_nothing(first.code, first.stderr, "rewrite")
        if first.code:
            assert first.stdout == ""
            return
        domxml.parse(first.stdout.encode())
        second = rewrite(rig, first.stdout.encode(), *nodes)
        assert (second.code, second.stdout) == (0, first.stdout), "rewrite is not idempotent"
        # What the rewrite defines passes through the hook too.
        through_hook(rig, first.stdout.encode())

    check()


def test_generated_definitions_through_the_hook_exit_0_or_refuse_in_one_line(rig: Rig) -> None:
    @FUZZ
    @given(domain_xml())
    def check(xml: bytes) -> None:
        through_hook(rig, xml)

    check()


def through_hook(rig: Rig, xml: bytes) -> None:
    running = xml.replace(b"<domain type='kvm'>", b"<domain type='kvm' id='7'>", 1)
    if running == xml:
        running = live(xml, 7)
    for operation, subop in (("migrate", "begin"), ("prepare", "begin"), ("started", "begin"),
                             ("reconnect", "begin"), ("stopped", "end"), ("release", "end")):
        call = rig.call("fuzzed", operation, subop, running)
        one_line_or_nothing(call.code, call.stderr, operation)
        if operation in ("reconnect", "stopped", "release"):
            assert call.code == 0, f"{operation}: {call.stderr}"
        if operation == "migrate" and call.stdout:
            domxml.parse(call.stdout.encode())
    assert rig.reservations() == [], "release left a reservation behind"
