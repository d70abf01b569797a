"""The checks that run inside the two-NUMA-node test VM, against real nodes 0 and 1.

Started by the VM's init script with the project tree unpacked beside it.  Each section brings up the
private libvirtd sandbox (tests/sandbox.py) on one backend, runs its checks with TCG guests, and writes one
verdict line per check to the report file (the VM's second serial port, read by the host):
``numavm: PASS <section>/<check>`` or ``numavm: FAIL <section>/<check>: <line>`` (one such line per line of
the failure), then ``numavm: END``.  A section's checks run in order on one host whose nodes fill up as
they go; its last verdict, ``everything_given_back``, holds once every guest is stopped and each pool is
as it was.  A backend is added as one more Section: a name, how its sandbox comes up, and its checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hostpools

from dmem_libvirt.units import MiB, format_size

from sandbox import HOOK_FAILED, Sandbox, guest_xml

PREFIX = "numavm:"
ROOT = Path("/run/dmem-sandbox-numavm")
# Small pools: every byte a guest takes is pinned (written twice) and preallocated by a nested TCG QEMU.
PER_NODE = 128 * MiB
CELL = 32 * MiB
# Leaves less than one CELL free on its node.
FILLER = PER_NODE - CELL // 2
# More than node 1 has left once two CELL guests run there, less than an empty node.
BIG = 3 * CELL
SAVED = "/var/lib/libvirt/moved.save"
HOOK = "/etc/libvirt/hooks/qemu.d/50-dmem-libvirt"
# What libvirt gives a hook: cwd /, and only LC_ALL, PATH and HOME in the environment.
HOOK_ENV = ("env", "-i", "LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/")
# A kernel parameter that narrows the run to one section (vm.py run -k SECTION).
ONLY_PARAMETER = "numavm.only"


class CheckFailed(Exception):
    """A check saw something else than it expected; the message says what, with numbers."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---- what the host shows ------------------------------------------------------------------------------

def status(box: Sandbox) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(box.dmem("status", "--json").stdout)
    return data


def pools(box: Sandbox) -> dict[int, dict[str, int]]:
    return {pool["node"]: pool for pool in status(box)["pools"]}


def pages_by_node(box: Sandbox, name: str, mount: Path | None = None) -> dict[str, dict[int, int]]:
    """backing file name -> {host node: bytes} of guest ``name``'s RAM files under ``mount`` (the dmemfs
    mount by default), from its QEMU's numa_maps."""
    pid = box.qemu_pid(name)
    found: dict[str, dict[int, int]] = {}
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        files = [Path(f[len("file="):]) for f in fields if f.startswith("file=")]
        if not files or (mount or box.dmem_mount) not in files[0].parents:
            continue
        page = next(int(f.split("=")[1]) * 1024 for f in fields if f.startswith("kernelpagesize_kB="))
        per_node = found.setdefault(Path(files[0]).name, {})
        for field in fields:
            match = re.fullmatch(r"N(\d+)=(\d+)", field)
            if match:
                node = int(match.group(1))
                per_node[node] = per_node.get(node, 0) + int(match.group(2)) * page
    return found


def expect_on_node(box: Sandbox, name: str, file: str, node: int, size: int) -> None:
    """All of ``file``'s ``size`` bytes are resident on host node ``node`` (QEMU's numa_maps)."""
    seen = pages_by_node(box, name)
    expect(file in seen, f"{name}: QEMU maps no {file} on {box.dmem_mount}; its numa_maps show {seen}")
    shown = {n: format_size(b) for n, b in seen[file].items()}
    expect(seen[file] == {node: size}, f"{name}: {file} should have {format_size(size)} on node {node}, "
                                       f"numa_maps show {shown}")


def hook_line(stderr: str) -> str:
    found = HOOK_FAILED.findall(stderr)
    expect(len(found) == 1, f"virsh did not show one hook refusal: {stderr.strip()}")
    return str(found[0]).strip()


# ---- guests -----------------------------------------------------------------------------------------

class Guests:
    """The guests of one section, destroyed and undefined when the section ends."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.names: list[str] = []
        # What one check measured for a later one (the pools before the first guest, ...).
        self.notes: dict[str, Any] = {}

    def enable(self, name: str, memory: int, *, nodes: str | None = None, cells: Sequence[int] = ()) -> str:
        self.box.define(guest_xml(name, memory, domain_type=self.box.domain_type, cells=cells))
        self.names.append(name)
        self.box.dmem("enable", name, *(("--nodes", nodes) if nodes else ()))
        return name

    def start(self, name: str, memory: int, *, nodes: str | None = None, cells: Sequence[int] = ()) -> str:
        self.enable(name, memory, nodes=nodes, cells=cells)
        self.box.virsh("start", name)
        return name

    def placed(self, name: str, seen: dict[str, Any] | None = None) -> list[int]:
        """The host node of each cell, as the ledger records the guest's reservations."""
        return [r["node"] for r in (seen or status(self.box))["reservations"] if r["domain"] == name]

    def close(self) -> None:
        for name in self.names:
            self.box.virsh("destroy", name, check=False)
            self.box.virsh("undefine", name, check=False)
        self.names.clear()


# ---- dmemfs (emulated) on two real nodes ---------------------------------------------------------------
# The checks run in this order on one host whose nodes fill up as a working day's would: every nested
# TCG guest costs tens of seconds to start, so a guest one check starts is the next one's load.

def two_cells_across_nodes(g: Guests) -> None:
    box = g.box
    g.start("spread", 3 * CELL, nodes="0,1", cells=(CELL, 2 * CELL))
    expect(g.placed("spread") == [0, 1], f"spread: cells placed on {g.placed('spread')}, not [0, 1]")
    expect_on_node(box, "spread", "ram-node0", 0, CELL)
    expect_on_node(box, "spread", "ram-node1", 1, 2 * CELL)


def status_per_node(g: Guests) -> None:
    seen = status(g.box)
    pinned = {pool["node"]: (pool["total"], pool["pinned"], pool["reserved"]) for pool in seen["pools"]}
    want = {0: (PER_NODE, CELL, 0), 1: (PER_NODE, 2 * CELL, 0)}
    expect(pinned == want, f"status --json pools (total, pinned, reserved) {pinned}, expected {want}")
    domains = {d["name"]: d["nodes"] for d in seen["domains"]}
    expect(domains == {"spread": [0, 1]}, f"status --json domains on nodes {domains}")
    table = g.box.dmem("status").stdout
    for node, size in ((0, CELL), (1, 2 * CELL)):
        row = re.search(rf"^\s*{node}\s.*$", table, re.M)
        expect(row is not None and format_size(size) in row.group(0),
               f"status table has no node {node} row showing {format_size(size)} pinned:\n{table}")
    g.box.virsh("destroy", "spread")


def placed_on_node_1_when_node_0_is_fuller(g: Guests) -> None:
    box = g.box
    # Enabled while both nodes are empty, for the checks below.
    g.enable("arriving", CELL, nodes="0")
    g.enable("bound1", BIG, nodes="1")
    g.start("moved", CELL, nodes="0")
    box.virsh("save", "moved", SAVED)
    g.start("filler0", FILLER, nodes="0")
    g.start("newcomer", CELL)
    seen = status(box)
    free0 = next(p["free"] for p in seen["pools"] if p["node"] == 0)
    expect(g.placed("newcomer", seen) == [1],
           f"newcomer: placed on {g.placed('newcomer', seen)} with {format_size(free0)} free on node 0")
    expect_on_node(box, "newcomer", "pc.ram", 1, CELL)


def restore_retargets_when_the_recorded_node_is_full(g: Guests) -> None:
    box = g.box
    try:
        box.virsh("restore", SAVED)
    finally:
        box.private(SAVED).unlink(missing_ok=True)
    expect(g.placed("moved") == [1], f"moved: restored onto node(s) {g.placed('moved')}, "
                                     "its recorded node 0 being full")
    expect_on_node(box, "moved", "pc.ram", 1, CELL)


def migrate_retargets_when_the_recorded_node_is_full(g: Guests) -> None:
    """`migrate begin` as libvirt runs it on a destination host: the XML on stdin, the new one on stdout."""
    box = g.box
    xml = box.virsh("dumpxml", "--migratable", "arriving").stdout
    hook = [*HOOK_ENV, HOOK, "arriving"]
    result = box.run([*hook, "migrate", "begin", "-"], input=xml, check=False)
    try:
        expect(result.returncode == 0, f"migrate begin exited {result.returncode}: {result.stderr.strip()}")
        expect(re.search(r"<memory [^>]*nodeset=.1.", result.stdout) is not None,
               f"migrate begin printed no <numatune> on node 1:\n{result.stdout[:2000]}")
    finally:
        # What libvirt runs when the incoming migration ends without a guest: whatever migrate begin
        # booked must come back.
        box.run([*hook, "release", "end", "-"], input=xml, check=False)
    expect(g.placed("arriving") == [], f"arriving: release end left reservations on {g.placed('arriving')}")


def refusal_names_node_1_while_node_0_has_room(g: Guests) -> None:
    box = g.box
    box.virsh("destroy", "filler0")
    free = {pool["node"]: format_size(pool["free"] - pool["reserved"]) for pool in status(box)["pools"]}
    refused = box.virsh("start", "bound1", check=False)
    expect(refused.returncode != 0, f"bound1 ({format_size(BIG)}, bound to node 1) started; "
                                    f"free (less reserved) per node before: {free}")
    line = hook_line(refused.stderr)
    expect(line.startswith("dmem-libvirt: bound1: ") and "host node 1" in line and "node 0" not in line,
           f"the refusal should name host node 1 only: {line}")
    seen = status(box)
    free0 = next(p["free"] for p in seen["pools"] if p["node"] == 0)
    expect(free0 >= BIG, f"node 0 should have room for {format_size(BIG)}, has {format_size(free0)}")
    expect(g.placed("bound1", seen) == [], f"bound1 holds reservations after its refusal: {g.placed('bound1', seen)}")


# ---- hugetlbfs on the VM's real per-node pools ------------------------------------------------------------
# What each node's 2 MiB pool may grow to: room for one CELL guest beside a HUGE_BIG one, not two.
HUGE_LIMIT = 2 * CELL
HUGE_BIG = 3 * CELL // 2


def huge_pools() -> dict[int, int]:
    """nr_hugepages of each node's 2 MiB pool, as the kernel reports it."""
    return {node: hostpools.pool(node)[0] for node in (0, 1)}


def node_1_pool_grown_only(g: Guests) -> None:
    box = g.box
    g.notes["pools"] = before = huge_pools()
    # Enabled while node 1's limit still has room for it, for the refusal below.
    g.enable("hbig", HUGE_BIG, nodes="1", cells=(HUGE_BIG,))
    g.start("huge1", CELL, nodes="1", cells=(CELL,))
    after = huge_pools()
    want = {0: before[0], 1: before[1] + CELL // hostpools.PAGE}
    expect(after == want, f"2 MiB pools (nr_hugepages per node) {after} after starting huge1 on node 1; "
                          f"expected {want}")
    mount = box.hugetlbfs_mounts[hostpools.PAGE]
    seen = {n: b for per_file in pages_by_node(box, "huge1", mount).values() for n, b in per_file.items()}
    expect(seen == {1: CELL}, f"huge1: its RAM on {mount} should be {format_size(CELL)} on node 1, "
                              f"numa_maps show {({n: format_size(b) for n, b in seen.items()})}")


def limit_refusal_names_node_1_while_node_0_has_room(g: Guests) -> None:
    before = huge_pools()
    refused = g.box.virsh("start", "hbig", check=False)
    expect(refused.returncode != 0, f"hbig ({format_size(HUGE_BIG)} on node 1) started beside huge1 although "
                                    f"node 1's pool may grow to {format_size(HUGE_LIMIT)} only")
    line = hook_line(refused.stderr)
    expect(line.startswith("dmem-libvirt: hbig: ") and "host node 1" in line and "node 0" not in line
           and format_size(HUGE_LIMIT) in line, f"the refusal should name host node 1 and its limit: {line}")
    expect(huge_pools() == before, f"the refusal changed the pools: {huge_pools()}, before {before}")
    room0 = HUGE_LIMIT - (before[0] - g.notes["pools"][0]) * hostpools.PAGE
    expect(room0 >= HUGE_BIG, f"node 0 should have room for {format_size(HUGE_BIG)}, has {format_size(room0)}")


def node_1_pool_given_back(g: Guests) -> None:
    g.box.virsh("destroy", "huge1")
    expect(huge_pools() == g.notes["pools"], f"2 MiB pools after huge1 stopped: {huge_pools()}, "
                                             f"before it started: {g.notes['pools']}")


def use_hugetlbfs(box: Sandbox) -> None:
    box.use_config(box.hugetlbfs_config({0: HUGE_LIMIT, 1: HUGE_LIMIT}))


class TimedSandbox(Sandbox):
    """The sandbox, printing each command it runs and how long it took on the console."""

    def run(self, argv: Sequence[str | os.PathLike[str]], check: bool = True, input: str | None = None,
            timeout: float | None = 120.0) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        try:
            return super().run(argv, check=check, input=input, timeout=timeout)
        finally:
            words = [Path(str(word)).name if i == 0 else str(word) for i, word in enumerate(argv)]
            print(f"    {time.monotonic() - started:6.1f} s  {' '.join(words)[:160]}", flush=True)


def timed_sandbox() -> Sandbox:
    return TimedSandbox(ROOT, PER_NODE)


# ---- sections and the runner ----------------------------------------------------------------------------

Check = Callable[[Guests], None]


@dataclass(frozen=True)
class Section:
    """Checks that run in order on one sandbox, then GIVEN_BACK: the pools as they were before."""

    name: str
    sandbox: Callable[[], Sandbox]
    checks: tuple[Check, ...]
    # Run once the sandbox is up (its backend's configuration).
    configure: Callable[[Sandbox], None] | None = None

    def names(self) -> list[str]:
        return [f"{self.name}/{c.__name__}" for c in self.checks] + [f"{self.name}/{GIVEN_BACK}"]


SECTIONS = (
    Section("dmemfs", timed_sandbox, (
        two_cells_across_nodes,
        status_per_node,
        placed_on_node_1_when_node_0_is_fuller,
        restore_retargets_when_the_recorded_node_is_full,
        migrate_retargets_when_the_recorded_node_is_full,
        refusal_names_node_1_while_node_0_has_room,
    )),
    Section("hugetlbfs", timed_sandbox, (
        node_1_pool_grown_only,
        limit_refusal_names_node_1_while_node_0_has_room,
        node_1_pool_given_back,
    ), configure=use_hugetlbfs),
)
# Checks of the VM itself, before any section: without two nodes nothing else means anything.
TOPOLOGY = "vm/two_numa_nodes"
GIVEN_BACK = "everything_given_back"


def check_names(sections: Sequence[Section] = SECTIONS) -> list[str]:
    """Every verdict the host must find in the report, in order."""
    return [TOPOLOGY] + [name for section in sections for name in section.names()]


class Report:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def line(self, text: str) -> None:
        self.out.write(f"{PREFIX} {text}\n")
        self.out.flush()
        # The console gets the same line with the VM's uptime, to see where the time goes.
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        print(f"[{uptime:7.1f} s] {text}", flush=True)

    def verdict(self, name: str, error: BaseException | None) -> None:
        if error is None:
            self.line(f"PASS {name}")
            return
        text = str(error) if isinstance(error, CheckFailed) else _describe(error)
        for line in text.splitlines() or ["(no message)"]:
            self.line(f"FAIL {name}: {line}")


def _describe(error: BaseException) -> str:
    """An unexpected error: its message and where it was raised (the innermost frame of this file)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
    where = f" (at {Path(__file__).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {message}{where}"


def run_check(report: Report, name: str, check: Callable[[], None]) -> bool:
    try:
        check()
    except Exception as err:
        report.verdict(name, err)
        return False
    report.verdict(name, None)
    return True


def check_topology() -> None:
    online = Path("/sys/devices/system/node/online").read_text().strip()
    expect(online == "0-1", f"the VM's online NUMA nodes are {online!r}, not '0-1'")


def run_section(report: Report, section: Section) -> None:
    names = section.names()
    box = section.sandbox()
    try:
        box.up()
        if section.configure is not None:
            section.configure(box)
    except Exception as err:
        for name in names:
            report.verdict(name, CheckFailed(f"the {section.name} sandbox did not come up: {_describe(err)}"))
        box.down()
        return
    try:
        empty = pools(box)
        made = Guests(box)
        for name, check in zip(names, section.checks, strict=False):
            run_check(report, name, partial(check, made))

        def given_back() -> None:
            made.close()
            seen = status(box)
            left = {pool["node"]: pool for pool in seen["pools"]}
            expect(left == empty and not seen["reservations"],
                   f"after every guest stopped: pools {left}, reservations {seen['reservations']}; "
                   f"before: {empty}")

        run_check(report, names[-1], given_back)
    finally:
        box.down()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the two-node checks, inside the test VM")
    parser.add_argument("--report", type=Path, required=True, help="where the verdict lines go")
    args = parser.parse_args(argv)
    only = next((word.split("=", 1)[1] for word in Path("/proc/cmdline").read_text().split()
                 if word.startswith(ONLY_PARAMETER + "=")), None)
    sections = [section for section in SECTIONS if not only or section.name == only]
    with open(args.report, "w") as out:
        report = Report(out)
        report.line("START " + " ".join(check_names(sections)))
        if run_check(report, TOPOLOGY, check_topology):
            for section in sections:
                run_section(report, section)
        report.line("END")
    return 0


if __name__ == "__main__":
    sys.exit(main())
