"""SIGKILL a process that keeps changing the ledger, 200 times, and check the ledger after every kill."""

import multiprocessing
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dmem_libvirt.ledger import Ledger, Reservation
from dmem_libvirt.units import MiB

BOOT = "5d1e7c44-0000-4000-8000-00000000c0de"
ENTRIES = 8
SHARE = 1024 * MiB
TOTAL = ENTRIES * SHARE
KILLS = 200
FORK = multiprocessing.get_context("fork")


def entry(index: int, size: int, node: int = 0) -> Reservation:
    return Reservation(domain=f"guest{index}", uuid=f"uuid-{index}", node=node, bytes=size, page_size=2 * MiB,
                       backend="dmemfs", file="pc.ram", state="reserved", origin="prepare",
                       created=time.time())


def churn(state_dir: Path, seed: int) -> None:
    """Forever: move bytes between two guests, or retire one guest and admit a new one of the same size."""
    try:
        rng = random.Random(seed)
        ledger = Ledger(state_dir, BOOT, lock_timeout=10.0)
        serial = 0
        while True:
            with ledger.transaction() as book:
                if rng.random() < 0.5:
                    giver, taker = rng.sample(book.reservations, 2)
                    amount = rng.randrange(0, giver.bytes // MiB + 1) * MiB
                    book.replace_uuid(giver.uuid, [replace(giver, bytes=giver.bytes - amount,
                                                           node=rng.randrange(2))])
                    book.replace_uuid(taker.uuid, [replace(taker, bytes=taker.bytes + amount)])
                else:
                    [gone] = book.remove_uuid(rng.choice(book.reservations).uuid)
                    serial += 1
                    book.add(entry(seed * 100_000 + serial, gone.bytes, node=gone.node))
    finally:
        os._exit(1)


@pytest.mark.slow
def test_a_ledger_killed_at_any_moment_always_loads_and_never_double_books(tmp_path: Path) -> None:
    seed = time.time_ns() % 1_000_000
    rng = random.Random(seed)
    ledger = Ledger(tmp_path / "state", BOOT, lock_timeout=10.0)
    with ledger.transaction() as book:
        for index in range(ENTRIES):
            book.add(entry(index, SHARE))
    states_seen = set()
    temps_seen = 0
    for kill in range(KILLS):
        child = FORK.Process(target=churn, args=(ledger.state_dir, kill + 1))
        before = ledger.path.stat().st_ino
        child.start()
        # Kill only once the child is churning (each commit renames a new inode into place): on a loaded
        # machine its start-up alone can outlast the random delay.
        deadline = time.monotonic() + 10
        while ledger.path.stat().st_ino == before and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.020))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        assert child.exitcode == -signal.SIGKILL, f"kill {kill} (seed {seed}): the child exited on its own"
        temps_seen += len(list(ledger.state_dir.glob(".ledger.json.tmp-*")))

        entries = ledger.read()
        where = f"after kill {kill} (seed {seed})"
        assert len(entries) == ENTRIES, where
        assert sum(e.bytes for e in entries) == TOTAL, where
        assert len({(e.uuid, e.file) for e in entries}) == ENTRIES, where
        states_seen.add(tuple(entries))

    # The kills must have landed while the ledger was changing, not all before the first commit.
    assert len(states_seen) > KILLS // 2, f"only {len(states_seen)} distinct ledgers in {KILLS} kills"
    with ledger.transaction(timeout=1.0):
        pass
    assert list(ledger.state_dir.glob(".ledger.json.tmp-*")) == []
    print(f"\n{KILLS} kills, {len(states_seen)} distinct ledgers, {temps_seen} temp files left by a kill")
