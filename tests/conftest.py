"""Shared pytest options and fixtures: `pytest --regenerate-goldens` rewrites tests/data/rewrite/*-out.xml;
`rig` is a fake host driven through the hook (tests/test_hook.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hook import Rig


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-goldens",
        action="store_true",
        default=False,
        help="write the current rewrite output over tests/data/rewrite/<case>-out.xml instead of "
             "comparing; review the result with `git diff tests/data/rewrite` before committing it",
    )


@pytest.fixture
def regenerate_goldens(request: pytest.FixtureRequest) -> bool:
    """True when the run was asked to rewrite the golden -out files."""
    return bool(request.config.getoption("--regenerate-goldens"))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A fake host of two nodes with 64 MiB of 2 MiB dmem pages each, driven through the hook."""
    made = Rig(tmp_path / "host")
    try:
        yield made
    finally:
        made.close()
