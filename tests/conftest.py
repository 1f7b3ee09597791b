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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (`pytest.mark.usefixtures`), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (CounterFact, WikiText-2); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the CounterFact / WikiText test data is not here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M converted once by `editd model fetch`, shared by every real-model test.

    Kept in the user's model cache (not the test's temporary directory), so the download and
    conversion happen once per machine, as they do for a user.
    """
    from editd.models.fetch import SMOLLM2, FetchError, fetch

    try:
        return fetch(SMOLLM2)
    except FetchError as exc:
        pytest.skip(f"SmolLM2-135M cannot be fetched here: {exc}")
