"""A randomized model of libvirt driving the real hook and command on a fake host, with faults.

`Run(seed, steps, nodes)` draws operations from a seeded generator — every order in which libvirt calls
the hook (normal, failed and aborted starts, stop without release, release twice, daemon restarts with and
without pid files, incoming migration and restore), the command (rewrite, status, reconcile) and faults
(a damaged or deleted ledger, a hook SIGKILLed mid-transaction, hooks racing, a recycled pid, the clock
jumping past the orphan grace, a file still mapped at release, hostile metadata) — and executes each on a
`World`: tests/test_hook.py's Rig (emulated dmemfs on a real tmpfs), driven through `hook.main` as libvirt
would.  After every step `World.check` asserts the invariants; at the end every guest is stopped and
reconcile must leave an empty ledger, no backing file and every counter back to full.  A violation
raises `Violation` with the operations so far; `shrink` cuts that list to a shortest one that still fails.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from lxml import etree
from test_hook import Call, Rig, guest_xml, libvirt_escaped, live

from dmem_libvirt import cli, hook, status
from dmem_libvirt.ledger import Reservation
from dmem_libvirt.units import MiB

PAGE = 2 * MiB
NAMES = ("web01", "q'u", "db 02", "ünï", "a&b", "a-very-long-guest-name-0123456789")
NS = "http://dmem-libvirt.org/xmlns/domain/1"
NEVER_FAIL = ("stopped", "release", "reconnect")
# (attribute path in our metadata, values a hand edit may leave there)
HOSTILE = (
    ("cell", "file", ("..", "", "a/b", ".", "x" * 300, "ram node0")),
    ("cell", "node", ("99", "-1", "abc", "", "1e3")),
    ("cell", "bytes", ("0", "1", "99999999999999999999999", "-5", "2M")),
    ("cell", "id", ("7", "-1", "x")),
    ("memory", "page-size", ("0", "4096", "3", "1073741824")),
    ("memory", "backend", ("", "hugetlbfs", "dax", "dmemfs\n")),
    ("memory", "version", ("2", "")),
)


class Violation(AssertionError):
    """An invariant broke; ``ops`` are the operations that led there."""

    def __init__(self, message: str, ops: Sequence[Op] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.ops = list(ops)


@dataclass(frozen=True)
class Op:
    kind: str
    guest: int = 0
    arg: tuple[object, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}({NAMES[self.guest]!r}{''.join(f', {a!r}' for a in self.arg)})"


@dataclass
class Guest:
    name: str
    uuid: str
    plain: bytes
    defined: bytes
    live: bytes | None = None
    state: str = "off"          # off | running
    dom_id: int = 0
    pid: int | None = None


@dataclass
class World:
    """A fake host, its guests as libvirt sees them, and the processes standing for QEMU."""

    rig: Rig
    guests: list[Guest]
    counts: Counter[str] = field(default_factory=Counter)
    next_id: int = 1
    next_pid: int = 5000
    lingering: dict[int, list[Path]] = field(default_factory=dict)   # QEMUs still mapping after a stop
    dead_pids: list[int] = field(default_factory=list)
    ledger_fault: bytes | None = None   # the damaged ledger a fault left, until a transaction repairs it

    @classmethod
    def create(cls, root: Path, nodes: int) -> World:
        rig = Rig(root, nodes=nodes, per_node=32 * MiB, mount_size=256 * MiB)
        guests = []
        for name in NAMES:
            plain = guest_xml(escape(name), [4 * MiB]).encode()
            guests.append(Guest(name, _uuid(plain), plain, plain))
        return cls(rig, guests)

    def close(self) -> None:
        self.rig.close()

    # ---- what libvirt and the operator do ------------------------------------------------------------

    def hook(self, guest: Guest, operation: str, subop: str, xml: bytes) -> Call:
        call = self.rig.call(guest.name, operation, subop, xml)
        self.counts[f"hook {operation}"] += 1
        self._check_call(guest, operation, call)
        return call

    def _check_call(self, guest: Guest, operation: str, call: Call) -> None:
        where = f"{operation} of {guest.name!r}"
        if "Traceback" in call.stderr or "internal error" in call.stderr:
            raise Violation(f"{where} ended in an internal error: {call.stderr.strip()}")
        if call.code not in (0, 1):
            raise Violation(f"{where} exited {call.code}")
        if call.code and operation in NEVER_FAIL:
            raise Violation(f"{where} exited {call.code}: {call.stderr.strip()}")
        if call.code and (call.stderr.count("\n") != 1 or not call.stderr.startswith("dmem-libvirt: ")):
            raise Violation(f"{where} failed without exactly one line: {call.stderr!r}")
        if call.stdout and operation not in ("migrate", "restore"):
            raise Violation(f"{where} wrote to stdout: {call.stdout[:80]!r}")

    def command(self, *argv: str, stdin: bytes = b"") -> Call:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", str(self.rig.config_path), *argv], stdin=io.BytesIO(stdin), stdout=out,
                        stderr=err)
        call = Call(code, out.getvalue(), err.getvalue())
        self.counts[f"command {argv[0]}"] += 1
        if "Traceback" in call.stderr or code not in (0, 1):
            raise Violation(f"dmem-libvirt {' '.join(argv)} exited {code}: {call.stderr.strip()}")
        return call

    def define(self, guest: Guest, cells: Sequence[int], nodes: Sequence[int], hostile: tuple[int, int, int] | None
               ) -> None:
        if cells:
            plain = guest_xml(escape(guest.name), list(cells)).encode()
        else:
            plain = guest_xml(escape(guest.name), memory=8 * MiB).encode()
        result = self.command("rewrite", "--nodes", ",".join(str(n) for n in nodes), stdin=plain)
        if result.code:
            # Refused at define time (the node is full now): one line, and the old definition stays.
            if result.stderr.count("\n") != 1 or "ledger" in result.stderr:
                raise Violation(f"rewrite of {guest.name!r} on nodes {nodes} failed: {result.stderr.strip()}")
            return
        defined = result.stdout.encode()
        again = self.command("rewrite", "--nodes", ",".join(str(n) for n in nodes), stdin=defined)
        if again.stdout.encode() != defined:
            raise Violation(f"rewrite of {guest.name!r} is not idempotent")
        guest.plain = plain
        guest.defined = _hostile(defined, hostile) if hostile else defined

    def start(self, guest: Guest, how: str, incoming: str | None = None) -> None:
        """``virsh start`` (or an incoming migration/restore) as libvirt 9.0 runs the hook, failing where told."""
        guest.dom_id, self.next_id = self.next_id, self.next_id + 1
        xml = live(guest.defined, guest.dom_id)
        if incoming:
            arrived = self.hook(guest, incoming, "begin", xml)
            if arrived.code:
                return
            if arrived.stdout:
                xml = arrived.stdout.encode()
            if how == "abort":
                self._failed(guest, xml)
                return
        if self.hook(guest, "prepare", "begin", xml).code or how == "fail-after-prepare":
            self._failed(guest, xml)
            return
        directory = self.rig.domain_dir(guest.name, guest.dom_id)
        if self.hook(guest, "start", "begin", xml).code or how == "fail-after-start":
            self._failed(guest, xml)
            return
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.rig.running(guest.name, xml, pid)
        if how != "qemu-gone":
            self.rig.qemu(pid, sorted(directory.iterdir()))
        guest.live, guest.pid, guest.state = xml, pid, "running"
        if self.hook(guest, "started", "begin", xml).code:
            if how != "qemu-gone":
                self._exits(pid)
            self._failed(guest, xml)
            return
        if how == "qemu-gone" and NS.encode() in xml:
            raise Violation(f"started of {guest.name!r} passed without a QEMU process")

    def _failed(self, guest: Guest, xml: bytes) -> None:
        """libvirt after a failed start: everything removed, then stopped end and release end."""
        self._cleanup(guest)
        guest.live, guest.pid, guest.state = None, None, "off"
        self.hook(guest, "stopped", "end", xml)
        self.hook(guest, "release", "end", xml)

    def stop(self, guest: Guest, how: str) -> None:
        assert guest.live is not None and guest.pid is not None
        xml, pid = guest.live, guest.pid
        if how == "still-mapped":
            # QEMU lingers (stuck in the kernel) while libvirt gives up on it: its files stay mapped.
            run_dir = self.rig.config.libvirt.run_dir
            (run_dir / f"{guest.name}.xml").unlink(missing_ok=True)
            (run_dir / f"{libvirt_escaped(guest.name)}.pid").unlink(missing_ok=True)
            directory = next(self.rig.mount.glob(f"libvirt/qemu/{guest.dom_id}-*"))
            self.lingering[pid] = [directory, *sorted(directory.iterdir())]
        else:
            self._cleanup(guest)
            self._exits(pid)
            self.dead_pids.append(pid)
        guest.live, guest.pid, guest.state = None, None, "off"
        self.hook(guest, "stopped", "end", xml)
        if how != "no-release":
            self.hook(guest, "release", "end", xml)
        if how == "release-twice":
            self.hook(guest, "release", "end", xml)

    def _cleanup(self, guest: Guest) -> None:
        """What libvirt removes when this run of the guest ends: status, pid file and this run's memory files."""
        run_dir = self.rig.config.libvirt.run_dir
        (run_dir / f"{guest.name}.xml").unlink(missing_ok=True)
        (run_dir / f"{libvirt_escaped(guest.name)}.pid").unlink(missing_ok=True)
        directory = self.rig.mount / "libvirt" / "qemu" / f"{guest.dom_id}-{guest.name[:20]}"
        if directory.is_dir():
            for file in directory.iterdir():
                file.unlink()
            directory.rmdir()

    def _exits(self, pid: int) -> None:
        if (self.rig.config.host.proc / str(pid)).exists():
            self.rig.qemu_exits(pid)

    def linger_ends(self, pid: int) -> None:
        """A lingering QEMU finally exits; libvirt's leftovers of its run go with it."""
        directory, *files = self.lingering.pop(pid)
        self._exits(pid)
        self.dead_pids.append(pid)
        for file in files:
            file.unlink(missing_ok=True)
        if directory.exists():
            directory.rmdir()

    def restart_daemon(self, without_pid_file: bool) -> None:
        for guest in self.guests:
            if guest.state == "running":
                assert guest.live is not None
                if without_pid_file:
                    (self.rig.config.libvirt.run_dir / f"{libvirt_escaped(guest.name)}.pid").unlink(missing_ok=True)
                self.hook(guest, "reconnect", "begin", guest.live)
                if without_pid_file and guest.pid is not None:
                    self.rig.running(guest.name, guest.live, guest.pid)

    def killed(self, guest: Guest, operation: str, delay: float) -> None:
        """A hook process SIGKILLed ``delay`` seconds in, then what libvirt does about the failure."""
        guest.dom_id, self.next_id = self.next_id, self.next_id + 1
        xml = live(guest.defined, guest.dom_id)
        if operation == "start":
            if self.hook(guest, "prepare", "begin", xml).code:
                self._failed(guest, xml)
                return
            self.rig.domain_dir(guest.name, guest.dom_id)
        subop = "end" if operation == "release" else "begin"
        child = self._fork_hook(guest, operation, subop, xml)
        time.sleep(delay)
        os.kill(child, signal.SIGKILL)
        _, status_ = os.waitpid(child, 0)
        self.counts[f"killed {operation}" if os.WIFSIGNALED(status_) else f"outran kill {operation}"] += 1
        self._failed(guest, xml)

    def race(self, guests: Sequence[Guest]) -> None:
        """Several prepares at once, each in its own process; the winners go on to start, the rest fail."""
        xmls = {}
        children = {}
        for guest in guests:
            guest.dom_id, self.next_id = self.next_id, self.next_id + 1
            xmls[guest.name] = live(guest.defined, guest.dom_id)
            children[guest.name] = self._fork_hook(guest, "prepare", "begin", xmls[guest.name])
        for guest in guests:
            _, status_ = os.waitpid(children[guest.name], 0)
            code = os.waitstatus_to_exitcode(status_)
            self.counts["hook prepare"] += 1
            if code not in (0, 1):
                raise Violation(f"racing prepare of {guest.name!r} exited {code}")
            if code:
                self._failed(guest, xmls[guest.name])
        self.check()

    def _fork_hook(self, guest: Guest, operation: str, subop: str, xml: bytes) -> int:
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            code = 3
            try:
                code = hook.main(["dmem-libvirt-hook", guest.name, operation, subop, "-"], io.BytesIO(xml),
                                 io.StringIO(), io.StringIO(), context=self.rig.context())
            finally:
                os._exit(code)
        return child

    def damage_ledger(self, how: str, rng: random.Random) -> None:
        path = self.rig.config.state.dir / "ledger.json"
        if not path.exists():
            return
        data = path.read_bytes()
        if how == "deleted":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(data[: rng.randrange(len(data))])
        elif how == "garbage":
            path.write_bytes(os.urandom(rng.randrange(1, 200)))
        elif how == "bad-entry":
            try:
                document = json.loads(data)
                document["reservations"].insert(0, {"domain": "evil", "file": "../etc", "uuid": "u"})
            except (ValueError, KeyError, AttributeError):
                return
            path.write_text(json.dumps(document))
        self.ledger_fault = path.read_bytes() if path.exists() else b""

    def reuse_pid(self, rng: random.Random) -> None:
        """An unrelated process gets the pid of a QEMU that exited."""
        pid = self.dead_pids.pop(rng.randrange(len(self.dead_pids)))
        self.rig.qemu(pid, [], start_ticks=10**9 + pid)

    # ---- invariants ----------------------------------------------------------------------------------

    def check(self) -> None:
        path = self.rig.config.state.dir / "ledger.json"
        raw = path.read_bytes() if path.exists() else b""
        if self.ledger_fault is not None and raw != self.ledger_fault:
            self.ledger_fault = None
        entries, damage = self.rig.ledger.snapshot()
        if damage and self.ledger_fault is None:
            raise Violation(f"the ledger is damaged though no fault did it: {damage}")
        try:
            document = json.loads(raw) if raw else {"reservations": []}
            keys = [(e["uuid"], e["file"]) for e in document["reservations"]]
        except (ValueError, KeyError, TypeError):
            keys = []
        if self.ledger_fault is None and len(keys) != len(set(keys)):
            raise Violation("a (uuid, file) is booked twice in the ledger")
        page = PAGE
        self._accounting(entries)
        for node in range(self.nodes):
            total = int((self.rig.config.dmemfs.debugfs / f"node{node}" / "total_dpages").read_text()) * page
            free = self.rig.free_pages(node) * page
            booked = sum(e.bytes for e in entries if e.node == node)
            if booked > total:
                raise Violation(f"node {node}: {booked} bytes booked of {total}")
            if not 0 <= free <= total:
                raise Violation(f"node {node}: free counter {free} outside 0..{total}")
        if self.ledger_fault is None:
            for guest in self.guests:
                if guest.state != "running" or guest.live is None or NS.encode() not in guest.live:
                    continue
                held = {e.file for e in entries if e.uuid == guest.uuid and e.state == "pinned"}
                wanted = set(_files(guest.live))
                if not wanted <= held:
                    raise Violation(f"running guest {guest.name!r} holds {sorted(held)}, not {sorted(wanted)}")

    def _accounting(self, entries: Sequence[Reservation]) -> None:
        """The counters count the pages of the pinned files that exist: no page lost, none counted twice.

        The emulation counts pages per file, as the kernel does: whatever a fault interrupted, a file's pages
        are back once it is gone, and a file the ledger pins is counted.  Only a hook killed between pinning
        a file and counting it leaves a file that is not counted, until that file is removed.
        """
        self.rig.context().backend.pools()  # a reader settles the counters (status does the same)
        files = {str(path): path.lstat() for path in self.rig.mount.rglob("*") if path.is_file()}
        pinned: Counter[int] = Counter()
        for entry in entries:
            info = files.get(entry.path or "")
            if entry.state == "pinned" and info is not None and info.st_ino == entry.inode:
                pinned[entry.node] += entry.bytes // PAGE
        taken = {}
        for node in range(self.nodes):
            total = int((self.rig.config.dmemfs.debugfs / f"node{node}" / "total_dpages").read_text())
            taken[node] = total - self.rig.free_pages(node)
            if taken[node] < pinned[node]:
                raise Violation(f"node {node}: the ledger pins {pinned[node]} pages in files that exist, "
                                f"the counters count {taken[node]} taken")
        on_disk = sum(-(-info.st_size // PAGE) for info in files.values())
        if sum(taken.values()) > on_disk:
            raise Violation(f"the counters count {sum(taken.values())} pages taken, the files on the mount "
                            f"hold {on_disk}: pages lost")
        if self.ledger_fault is None and sum(pinned.values()) == on_disk and \
                any(taken[node] != pinned[node] for node in taken):
            raise Violation(f"every file is pinned in the ledger, yet the counters count {taken} pages taken "
                            f"per node, the ledger {dict(pinned)}")

    @property
    def nodes(self) -> int:
        return len(list((self.rig.config.dmemfs.debugfs).glob("node*")))

    def finish(self) -> None:
        """Every guest stops, the leftovers go, time passes, reconcile: nothing may remain."""
        for guest in self.guests:
            if guest.state == "running":
                self.stop(guest, "normal")
                self.check()
        for pid in list(self.lingering):
            self.linger_ends(pid)
        self.check()
        self.rig.now += 2 * self.rig.config.state.orphan_grace + 1
        self.counts["reconcile"] += 1
        status.reconcile(self.rig.context())
        left = self.rig.ledger.read()
        if left:
            raise Violation(f"after every guest stopped and reconcile: the ledger still holds "
                            f"{[(e.domain, e.file, e.state) for e in left]}")
        files = [p for p in self.rig.mount.rglob("*") if p.is_file()]
        if files:
            raise Violation(f"after reconcile backing files remain: {files}")
        for node in range(self.nodes):
            total = int((self.rig.config.dmemfs.debugfs / f"node{node}" / "total_dpages").read_text())
            if self.rig.free_pages(node) != total:
                raise Violation(f"after reconcile node {node} has {self.rig.free_pages(node)} of {total} pages free")


def _uuid(xml: bytes) -> str:
    return str(etree.fromstring(xml).findtext("uuid"))


def _files(xml: bytes) -> list[str]:
    return [str(cell.get("file")) for cell in etree.fromstring(xml).iter(f"{{{NS}}}cell")]


def _hostile(xml: bytes, hostile: tuple[int, int, int]) -> bytes:
    which, value, cell = hostile
    where, attribute, values = HOSTILE[which % len(HOSTILE)]
    root = etree.fromstring(xml)
    targets = list(root.iter(f"{{{NS}}}{where}"))
    if targets:
        targets[cell % len(targets)].set(attribute, values[value % len(values)])
    return etree.tostring(root)


# ---- generating and running operations -----------------------------------------------------------------

START_HOW = ("normal", "normal", "normal", "fail-after-prepare", "fail-after-start", "qemu-gone")
STOP_HOW = ("normal", "normal", "no-release", "release-twice", "still-mapped")
LEDGER_DAMAGE = ("deleted", "truncated", "garbage", "bad-entry")


def choose(world: World, rng: random.Random) -> Op:
    """The next operation, drawn from what makes sense now (and sometimes what does not)."""
    off = [i for i, g in enumerate(world.guests) if g.state == "off"]
    running = [i for i, g in enumerate(world.guests) if g.state == "running"]
    nodes = world.nodes
    weights: list[tuple[float, Callable[[], Op]]] = []

    def define() -> Op:
        cells = [rng.choice((2, 4, 6, 8, 12)) * MiB for _ in range(rng.randrange(0, 4))]
        # Node 0 is the only node this machine can really bind pages to (a one-node host): most guests go there.
        placed = [0 if rng.random() < 0.7 else rng.randrange(nodes) for _ in (cells or [0])]
        hostile = (rng.randrange(99), rng.randrange(99), rng.randrange(4)) if rng.random() < 0.1 else None
        return Op("define", rng.choice(off), (tuple(cells), tuple(placed), hostile))

    if off:
        weights += [(3, define), (0.5, lambda: Op("disable", rng.choice(off))),
                    (6, lambda: Op("start", rng.choice(off), (rng.choice(START_HOW),))),
                    (1, lambda: Op("migrate", rng.choice(off), (rng.choice(("success", "abort")),))),
                    (0.5, lambda: Op("restore", rng.choice(off), (rng.choice(("success", "abort")),))),
                    (0.7, lambda: Op("kill", rng.choice(off), (rng.choice(("prepare", "start", "release")),
                                                               round(rng.uniform(0, 0.008), 4)))),
                    (0.3, lambda: Op("release-stray", rng.choice(off)))]
    if len(off) >= 2:
        weights.append((0.6, lambda: Op("race", 0, tuple(rng.sample(off, min(len(off), rng.randrange(2, 5)))))))
    if running:
        weights += [(4, lambda: Op("stop", rng.choice(running), (rng.choice(STOP_HOW),))),
                    (0.8, lambda: Op("restart-daemon", 0, (rng.random() < 0.3,)))]
    if world.lingering:
        weights.append((1, lambda: Op("linger-ends", 0, (rng.choice(sorted(world.lingering)),))))
    if world.dead_pids:
        weights.append((0.4, lambda: Op("reuse-pid", 0, (rng.randrange(1 << 30),))))
    weights += [(0.5, lambda: Op("damage-ledger", 0, (rng.choice(LEDGER_DAMAGE), rng.randrange(1 << 30)))),
                (0.4, lambda: Op("clock-jump")), (0.5, lambda: Op("status")), (0.4, lambda: Op("reconcile"))]
    total = sum(weight for weight, _ in weights)
    pick = rng.uniform(0, total)
    for weight, make in weights:
        pick -= weight
        if pick <= 0:
            return make()
    return weights[-1][1]()


def apply(world: World, op: Op) -> bool:
    """Execute ``op`` if it still applies (a shrunk sequence may have removed what it needed)."""
    guest = world.guests[op.guest]
    kind = op.kind
    if kind in ("define", "disable", "start", "migrate", "restore", "kill", "release-stray") and guest.state != "off":
        return False
    if kind == "stop" and guest.state != "running":
        return False
    if kind == "define":
        cells, placed, hostile = op.arg
        world.define(guest, cells, placed, hostile)  # type: ignore[arg-type]
    elif kind == "disable":
        guest.defined = guest.plain
    elif kind == "start":
        world.start(guest, str(op.arg[0]))
    elif kind in ("migrate", "restore"):
        world.start(guest, "normal" if op.arg[0] == "success" else "abort", incoming=kind)
    elif kind == "kill":
        world.killed(guest, str(op.arg[0]), float(str(op.arg[1])))
    elif kind == "release-stray":
        world.hook(guest, "release", "end", live(guest.defined, 999))
    elif kind == "race":
        racers = [world.guests[int(str(i))] for i in op.arg if world.guests[int(str(i))].state == "off"]
        if len(racers) < 2:
            return False
        world.race(racers)
    elif kind == "stop":
        world.stop(guest, str(op.arg[0]))
    elif kind == "restart-daemon":
        world.restart_daemon(bool(op.arg[0]))
    elif kind == "linger-ends":
        if op.arg[0] not in world.lingering:
            return False
        world.linger_ends(int(str(op.arg[0])))
    elif kind == "reuse-pid":
        if not world.dead_pids:
            return False
        world.reuse_pid(random.Random(op.arg[0]))  # type: ignore[arg-type]
    elif kind == "damage-ledger":
        world.damage_ledger(str(op.arg[0]), random.Random(op.arg[1]))  # type: ignore[arg-type]
    elif kind == "clock-jump":
        world.rig.now += world.rig.config.state.orphan_grace + 1
    elif kind == "status":
        shown = world.command("status", "--json")
        if shown.code:
            raise Violation(f"status failed: {shown.stderr.strip()}")
        json.loads(shown.stdout)
    elif kind == "reconcile":
        status.reconcile(world.rig.context())
    return True


@dataclass
class Outcome:
    steps: int
    seconds: float
    counts: Counter[str]
    ops: list[Op]


def run(seed: int, steps: int, nodes: int, *, ops: Sequence[Op] | None = None) -> Outcome:
    """``steps`` operations drawn from ``seed`` (or exactly ``ops``) on a fresh fake host of ``nodes`` nodes."""
    rng = random.Random(seed)
    done: list[Op] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmem-model-") as root:
        world = World.create(Path(root) / "host", nodes)
        try:
            planned = iter(ops) if ops is not None else None
            while len(done) < (len(ops) if ops is not None else steps):
                op = next(planned) if planned is not None else choose(world, rng)
                done.append(op)
                try:
                    if apply(world, op):
                        world.counts[f"op {op.kind}" + (f" {op.arg[0]}" if op.kind in (
                            "start", "stop", "kill", "damage-ledger", "migrate", "restore") else "")] += 1
                    world.check()
                except Violation as violation:
                    raise Violation(f"{violation.message} (step {len(done)}: {op})", done) from None
            try:
                world.finish()
            except Violation as violation:
                raise Violation(violation.message, done) from None
        finally:
            world.close()
    return Outcome(len(done), time.perf_counter() - began, world.counts, done)


def shrink(ops: Sequence[Op], nodes: int, *, budget: float = 120.0) -> tuple[list[Op], str]:
    """A shorter operation list that still violates an invariant (delta debugging, within ``budget`` s)."""
    best = list(ops)
    message = _failure(best, nodes) or "did not fail again"
    deadline = time.monotonic() + budget
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        start = 0
        while start < len(best) and time.monotonic() < deadline:
            candidate = best[:start] + best[start + chunk:]
            failure = _failure(candidate, nodes)
            if failure:
                best, message = candidate, failure
            else:
                start += chunk
        chunk //= 2
    return best, message


def _failure(ops: Sequence[Op], nodes: int) -> str | None:
    try:
        run(0, len(ops), nodes, ops=ops)
    except Violation as violation:
        return violation.message
    return None


def report(outcome: Outcome) -> str:
    """Steps, rate and how often each operation and fault ran."""
    lines = [f"{outcome.steps} steps in {outcome.seconds:.1f} s: {outcome.steps / outcome.seconds:.0f} steps/s"]
    lines += [f"  {count:6d}  {name}" for name, count in sorted(outcome.counts.items())]
    return "\n".join(lines)
