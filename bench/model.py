"""The randomized lifecycle model, long: 10,000+ steps over hosts of 1 to 4 nodes; steps/s, what ran, violations.

    .venv/bin/python bench/model.py [--steps N] [--seed S]

Prints the seed, the rate, how often each operation and fault ran, and the violations (0 expected); on a
violation it prints the shortest operation sequence that still breaks the invariant and exits 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter
from pathlib import Path

# The model drives the hook through the tests' fake host: it lives beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lifecycle_model import Outcome, Violation, report, run, shrink


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=time.time_ns() % 1_000_000)
    parser.add_argument("--chunk", type=int, default=500, help="steps per fresh host (default 500)")
    args = parser.parse_args()
    # A stopped run still unmounts its fake host's tmpfs (the model's cleanup runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"lifecycle model: seed {args.seed}, {args.steps} steps on hosts of 1-4 nodes", flush=True)
    total = Outcome(0, 0.0, Counter(), [])
    violations = 0
    index = 0
    while total.steps < args.steps:
        nodes = index % 4 + 1
        run_seed = args.seed * 1000 + index
        index += 1
        try:
            outcome = run(run_seed, min(args.chunk, args.steps - total.steps), nodes)
        except Violation as violation:
            violations += 1
            shortest, message = shrink(violation.ops, nodes)
            print(f"VIOLATION (run seed {run_seed}, {nodes} nodes): {violation.message}\n"
                  f"shortest failing sequence ({len(shortest)} of {len(violation.ops)} steps): {message}")
            for op in shortest:
                print(f"  {op}")
            total.steps += len(violation.ops)
            continue
        total.steps += outcome.steps
        total.seconds += outcome.seconds
        total.counts.update(outcome.counts)
    print(report(total))
    print(f"violations: {violations}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
