"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from editd.consumers.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker (memory storage) on a free local port, one per test module."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session", autouse=True)
def c0_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One C0 cache for the whole run, in-process and in every daemon or bench subprocess.

    C0 of the built-in model takes most of a minute on two cores and is the same for every
    test (the files are keyed by model, layer, corpus and budget); tests that check caching
    itself use their own directory.
    """
    path = tmp_path_factory.mktemp("c0-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITD_EDITING__STATS_CACHE", str(path))
        yield path
