"""Adoption cost: ``prepare begin`` of a Nova-defined guest against the same guest enabled with metadata.

Run: ``.venv/bin/python bench/nova.py [--reps 200] [--guests 50]``.  In-process calls of ``hook.main`` (the
interpreter start, the same for both, is bench/hook.py's subject) on a fake two-node dmemfs host
(tests/fakehost.py) whose ledger holds ``--guests`` other guests' reservations.  The baseline is the guest as
`dmem-libvirt enable` writes it (cell 0 on node 0); the case is Nova's XML of the same guest
(tests/data/nova/instance-numa.xml: file-backed, <numatune> memnode on node 0, <nova:instance> metadata),
admitted with ``[adopt] file_backed = "admit"``.  Each call is followed by an untimed ``release end``; the two
run interleaved, one call of each in turn, and are reported as medians, spread (p10-p90) and their ratio.

A second table runs the hook as libvirt does (a fresh interpreter, the default config path) for guests it does
not admit: the baseline is Nova's hw:mem_page_size guest with memfd instead of huge pages, which the hook
parses and lets go; the case is the guest itself, for which the hook also reads the config to learn whether
the hugetlbfs backend admits it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lxml import etree

from dmem_libvirt import hook
from dmem_libvirt.config import AdoptConfig, Config
from dmem_libvirt.define import plan
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, MiB

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from fakehost import FakeNode, make_host  # noqa: E402 (the tests' fake host, beside them)

NOVA_XML = REPO / "tests" / "data" / "nova" / "instance-numa.xml"
NOVA_HUGEPAGES_XML = REPO / "tests" / "data" / "nova" / "instance-hugepages.xml"
HOOK = f"import sys; sys.path.insert(0, {str(REPO)!r}); from dmem_libvirt.hook import entry; sys.exit(entry())"
PAGE = 2 * MiB


def enabled_twin(nova: bytes) -> bytes:
    """The same guest as a user would enable it: Nova's metadata and memory backing gone, our rewrite applied."""
    root = etree.fromstring(nova)
    for path in ("metadata", "memoryBacking", "numatune"):
        element = root.find(path)
        if element is not None:
            root.remove(element)
    for element in root.iterfind("uuid"):
        element.text = str(uuid.uuid4())
    return plan(etree.tostring(root), page_size=PAGE, rooms=None, nodes=[0]).rewritten


def call(ctx: HookContext, name: str, operation: str, subop: str, xml: bytes) -> None:
    err = io.StringIO()
    code = hook.main(["hook", name, operation, subop, "-"], io.BytesIO(xml), io.StringIO(), err, context=ctx)
    if code != 0:
        raise SystemExit(f"{name} {operation}: exit {code}: {err.getvalue()}")


def timed(ctx: HookContext, name: str, xml: bytes) -> Callable[[], float]:
    """One timed prepare, then an untimed release; checks first that prepare really books the guest."""
    call(ctx, name, "prepare", "begin", xml)
    if not any(entry.domain == name for entry in ctx.ledger.read()):
        raise SystemExit(f"{name}: prepare admitted nothing; the comparison would be meaningless")
    call(ctx, name, "release", "end", xml)

    def once() -> float:
        start = time.perf_counter()
        call(ctx, name, "prepare", "begin", xml)
        elapsed = time.perf_counter() - start
        call(ctx, name, "release", "end", xml)
        return elapsed * 1000
    return once


def occupy(ctx: HookContext, guests: int) -> None:
    """Reservations of ``guests`` other guests, 256 MiB on each node, recorded as prepare would."""
    for index in range(guests):
        xml = plan(f"""<domain type="kvm"><name>other{index:03d}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit="KiB">{512 * 1024}</memory><vcpu>2</vcpu><os><type arch="x86_64">hvm</type></os>
  <cpu><numa><cell id="0" cpus="0" memory="{256 * 1024}" unit="KiB"/>
  <cell id="1" cpus="1" memory="{256 * 1024}" unit="KiB"/></numa></cpu></domain>""",
                   page_size=PAGE, rooms=None, nodes=[0, 1]).rewritten
        call(ctx, f"other{index:03d}", "prepare", "begin", xml)


def hook_process(xml: bytes) -> Callable[[], float]:
    """``prepare begin`` through a fresh interpreter, as libvirt runs the installed hook."""
    argv = [sys.executable, "-IS", "-c", HOOK, "guest", "prepare", "begin", "-"]
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}

    def once() -> float:
        start = time.perf_counter()
        done = subprocess.run(argv, input=xml, capture_output=True, env=env, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"hook exited {done.returncode}: {done.stderr.decode(errors='replace')}")
        return elapsed * 1000
    return once


def interleaved(cases: dict[str, Callable[[], float]], reps: int, warmup: int = 10) -> dict[str, list[float]]:
    """One call of each case in turn, so that drift from other load hits every case alike."""
    samples: dict[str, list[float]] = {label: [] for label in cases}
    for rep in range(reps + warmup):
        for label, once in cases.items():
            value = once()
            if rep >= warmup:
                samples[label].append(value)
    return samples


def report(title: str, samples: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(samples.values())))
    print(title)
    print(f"{'case':<44} {'median ms':>10} {'p10-p90 ms':>12} {'ratio':>6}")
    for label, values in samples.items():
        median = statistics.median(values)
        print(f"{label:<44} {median:10.2f} {spread(values):>12} {median / base:6.2f}")


def spread(samples: list[float]) -> str:
    deciles = statistics.quantiles(samples, n=10)
    return f"{deciles[0]:.2f}-{deciles[-1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--guests", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dmem-nova-bench-") as scratch:
        nodes = {n: FakeNode(cpus=[n], dmem_total=64 * GiB) for n in (0, 1)}
        config: Config = make_host(Path(scratch), nodes)
        config = replace(config, adopt=AdoptConfig(file_backed="admit"))
        ctx = HookContext.create(config)
        occupy(ctx, args.guests)
        nova = NOVA_XML.read_bytes()
        cases = {"enabled (our metadata)": timed(ctx, "enabled01", enabled_twin(nova)),
                 "adopted (Nova's XML)": timed(ctx, "instance-0000000b", nova)}
        samples = interleaved(cases, args.reps)
    report(f"prepare begin, in process, {args.guests} other guests in the ledger, {args.reps} interleaved calls each",
           samples)
    # The same guest on memfd: parsed by the hook as far as the hugepages one, but never file-backed or huge.
    memfd = NOVA_HUGEPAGES_XML.read_bytes().replace(
        b'<hugepages>\n      <page size="2048" nodeset="0" unit="KiB"/>\n    </hugepages>', b'<source type="memfd"/>')
    if memfd == NOVA_HUGEPAGES_XML.read_bytes():
        raise SystemExit(f"{NOVA_HUGEPAGES_XML} no longer has the <hugepages> element this benchmark replaces")
    print()
    report(f"prepare begin, hook process, default config, not admitted, {args.reps // 4} interleaved calls each",
           interleaved({"the same guest on memfd (parsed, no config)": hook_process(memfd),
                        "Nova hw:mem_page_size guest (reads config)": hook_process(NOVA_HUGEPAGES_XML.read_bytes())},
                       args.reps // 4, warmup=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
