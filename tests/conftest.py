"""Shared by every test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from namespace_guard import check_session

from sparsat.node.wire import security


@pytest.fixture(autouse=True)
def _no_credentials_left_behind() -> Iterator[None]:
    """A test that configures this process's credentials (the CLI's `run --ground-station
    --certs`, a LocalCluster) must not leave them to the next test."""
    yield
    security.configure(None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the suite: no module of this repository in sys.modules under a bare name
    (`node`, `sim.x`...), which would be a second copy of a sparsat module."""
    check_session(session, dict(sys.modules))
