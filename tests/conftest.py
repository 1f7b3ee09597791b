"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from editd.consumers.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker (memory storage) on a free local port, one per test module."""
    with EmbeddedBroker() as b:
        yield b
