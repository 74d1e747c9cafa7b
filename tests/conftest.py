"""Shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sparsat.node.wire import security


@pytest.fixture(autouse=True)
def _no_credentials_left_behind() -> Iterator[None]:
    """A test that configures this process's credentials (the CLI's `run --ground-station
    --certs`, a LocalCluster) must not leave them to the next test."""
    yield
    security.configure(None)
