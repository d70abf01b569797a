"""The randomized lifecycle model (tests/lifecycle_model.py) in CI: 1,000 steps over hosts of 1 to 4 nodes.

The seed is printed; rerun one with ``DMEM_MODEL_SEED=<seed> pytest tests/test_lifecycle_model.py``, or
longer with ``DMEM_MODEL_STEPS``.  ``make model`` (bench/model.py) runs 10,000 steps.  A failure
shows the shortest operation sequence that still breaks an invariant.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from lifecycle_model import Outcome, Violation, report, run, shrink

pytestmark = pytest.mark.slow


def test_randomized_lifecycle_with_faults_keeps_every_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("DMEM_MODEL_SEED") or time.time_ns() % 1_000_000)
    steps = int(os.environ.get("DMEM_MODEL_STEPS") or 1000)
    with capsys.disabled():
        print(f"\nlifecycle model: seed {seed}, {steps} steps on hosts of 1-4 nodes")
    total = Outcome(0, 0.0, Counter(), [])
    for nodes in (1, 2, 3, 4):
        run_seed = seed * 10 + nodes
        try:
            outcome = run(run_seed, steps // 4, nodes)
        except Violation as violation:
            shortest, message = shrink(violation.ops, nodes, budget=60)
            pytest.fail(f"seed {seed} ({nodes} nodes, run seed {run_seed}): {violation.message}\n"
                        f"shortest failing sequence ({len(shortest)} of {len(violation.ops)} steps): {message}\n"
                        + "\n".join(f"  {op}" for op in shortest))
        total.steps += outcome.steps
        total.seconds += outcome.seconds
        total.counts.update(outcome.counts)
    with capsys.disabled():
        print(report(total))
    assert total.steps >= steps
    faults = [name for name in ("op damage-ledger deleted", "op kill start", "op stop still-mapped", "hook reconnect")
              if total.counts[name] == 0]
    assert steps < 1000 or not faults, f"never exercised: {faults}"
