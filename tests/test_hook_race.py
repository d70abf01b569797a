"""Hooks in separate processes at once: admission under the host lock, and a lock that never comes free.

Each hook is its own `python -c` process, as libvirt would run it, calling `hook.main` with a HookContext
built from the fake host's config file.  Delays are printed (run with -s to see them), never asserted:
the subprocess timeout only guards against a hang.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hook import Rig, enabled, guest_xml, live, start_guest

from dmem_libvirt.ledger import Ledger, LedgerCorrupt
from dmem_libvirt.units import MiB

pytestmark = pytest.mark.slow

GUESTS = 20
FITTING = 10
GUEST_SIZE = 16 * MiB
PER_NODE = FITTING // 2 * GUEST_SIZE
LOCK_TIMEOUT = 2.0
HANG_GUARD = LOCK_TIMEOUT + 20

HOOK_SCRIPT = """
import os, sys, time
from dmem_libvirt import hook
from dmem_libvirt.config import load
from dmem_libvirt.lifecycle import HookContext

config, gate, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
context = HookContext.create(load(config))
if gate != "-":
    open(f"{gate}.ready.{os.getpid()}", "w").close()
while gate != "-" and not os.path.exists(gate):   # every process starts deciding at the same moment
    time.sleep(0.001)
sys.exit(hook.main(["dmem-libvirt-hook", *argv], sys.stdin.buffer, sys.stdout, sys.stderr, context=context))
"""

HOLD_LOCK_SCRIPT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".ljust(16).encode(), 0)
print("held", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Two host nodes with room for five 16 MiB guests each; hooks wait at most 2 s for the lock."""
    made = Rig(tmp_path / "host", per_node=PER_NODE, lock_timeout=LOCK_TIMEOUT)
    try:
        yield made
    finally:
        made.close()


def hook_process(rig: Rig, argv: list[str], xml: bytes, gate: Path | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", HOOK_SCRIPT, str(rig.config_path), str(gate or "-"), *argv],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(xml)
    process.stdin.close()
    return process


def ledger_bytes_per_node(ledger: Ledger) -> dict[int, int]:
    totals: dict[int, int] = {}
    for entry in ledger.read():
        totals[entry.node] = totals.get(entry.node, 0) + entry.bytes
    return totals


def test_twenty_simultaneous_prepares_admit_exactly_the_ten_that_fit(rig: Rig, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    guests = {f"guest{i:02d}": live(enabled(guest_xml(f"guest{i:02d}", [GUEST_SIZE]), [i % 2]), 100 + i)
              for i in range(GUESTS)}
    processes = {name: hook_process(rig, [name, "prepare", "begin", "-"], xml, gate) for name, xml in guests.items()}
    # Interpreters and imports first, so that the hooks really contend for the lock.
    waiting = time.monotonic()
    while len(list(tmp_path.glob("go.ready.*"))) < GUESTS:
        assert time.monotonic() - waiting < HANG_GUARD, "the hook processes did not start"
        time.sleep(0.01)
    started = time.monotonic()
    gate.touch()
    snapshots = 0
    while any(p.poll() is None for p in processes.values()):
        try:
            held = ledger_bytes_per_node(rig.ledger)
        except LedgerCorrupt as corrupt:
            pytest.fail(f"a reader saw a half-written ledger: {corrupt}")
        assert all(size <= PER_NODE for size in held.values()), held
        snapshots += 1
        assert time.monotonic() - started < HANG_GUARD * 3, "the prepares hang"
    results = {name: (p.wait(), p.stdout.read().decode(), p.stderr.read().decode())  # type: ignore[union-attr]
               for name, p in processes.items()}
    print(f"\n20 prepares in {time.monotonic() - started:.2f} s, {snapshots} ledger snapshots taken meanwhile")
    admitted = sorted(name for name, (code, _, _) in results.items() if code == 0)
    refused = sorted(name for name, (code, _, _) in results.items() if code == 1)
    assert (len(admitted), len(refused)) == (FITTING, GUESTS - FITTING), results
    for name in refused:
        _, out, err = results[name]
        node = int(name[-2:]) % 2
        assert out == ""
        assert err.startswith(f"dmem-libvirt: {name}: guest cell 0 needs 16.0 MiB of 2 MiB dmem pages on host "
                              f"node {node}; 80.0 MiB free, 80.0 MiB reserved by "), err
        assert err.count("\n") == 1
    entries = rig.reservations()
    assert sorted(e.domain for e in entries) == admitted
    assert ledger_bytes_per_node(rig.ledger) == {0: PER_NODE, 1: PER_NODE}
    for node in (0, 1):
        assert sum(1 for name in admitted if int(name[-2:]) % 2 == node) == FITTING // 2


def test_a_stuck_lock_holder_delays_reconnect_and_release_by_the_lock_timeout_and_both_exit_0(
        rig: Rig) -> None:
    running, _ = start_guest(rig, "web01", enabled(guest_xml("web01", [8 * MiB]), [0]), 5, 4242)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_SCRIPT, str(rig.ledger.lock_path)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        delays = {}
        for operation, subop in (("reconnect", "begin"), ("release", "end")):
            began = time.monotonic()
            process = hook_process(rig, ["web01", operation, subop, "-"], running)
            code = process.wait(timeout=HANG_GUARD)
            delays[operation] = time.monotonic() - began
            assert (code, process.stdout.read(), process.stderr.read()) == (0, b"", b""), operation  # type: ignore[union-attr]
        print(f"\nlock_timeout {LOCK_TIMEOUT:.1f} s; with the lock stuck: reconnect begin took "
              f"{delays['reconnect']:.2f} s, release end {delays['release']:.2f} s")
    finally:
        holder.kill()
        holder.wait()
    # Nothing was changed while the lock was stuck; the next release does the work.
    assert [e.domain for e in rig.reservations()] == ["web01"]
    rig.qemu_exits(4242)
    rig.stopped("web01")
    began = time.monotonic()
    process = hook_process(rig, ["web01", "release", "end", "-"], running)
    assert process.wait(timeout=HANG_GUARD) == 0
    print(f"release end with the lock free: {time.monotonic() - began:.2f} s (interpreter start-up included)")
    assert rig.reservations() == []
