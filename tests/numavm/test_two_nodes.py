"""The hook end to end on two real NUMA nodes: one boot of the nested two-node VM (tests/numavm/vm.py)
runs every check of tests/numavm/inside.py; each check is one test here, failing with the VM's own lines.

Marked `e2e_numa` (and `e2e`).  The first run on a machine builds the VM image (minutes); later runs reuse it."""

from __future__ import annotations

import os

import pytest

from .inside import check_names
from .vm import Outcome, run_checks

# Also `e2e`, so that `-m 'not e2e'` (the unit tests) never boots the VM.
pytestmark = [pytest.mark.e2e, pytest.mark.e2e_numa]


@pytest.fixture(scope="module")
def outcome() -> Outcome:
    if os.geteuid() != 0:
        pytest.fail("the two-node VM tests need root: they build a Debian image with debootstrap "
                    "(run `make e2e-numa` as root)", pytrace=False)
    return run_checks()


@pytest.mark.parametrize("name", check_names())
def test_check_passes_inside_the_two_node_vm(outcome: Outcome, name: str) -> None:
    problem = outcome.problem(name)
    if problem is not None:
        pytest.fail(f"{name} in the two-node VM:\n{problem}", pytrace=False)
