"""Shared pytest options: `pytest --regenerate-goldens` rewrites tests/data/rewrite/*-out.xml."""

from __future__ import annotations

import pytest


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
