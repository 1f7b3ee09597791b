"""Fixtures shared across test modules."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def cores_per_worker() -> Iterator[None]:
    """Under pytest-xdist (`make test` runs two workers) each worker, and every daemon or bench
    it starts, takes its share of the cores. Torch's default of one thread per core in each of
    two workers oversubscribes them, and its threads then wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    import torch

    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", str(share))
        yield


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
