"""`editd bench edit --store DIR --curve FILE`: a long run resumes where it stopped, on the
daemon's own store, and its curve holds one point per interval, none twice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from editd.bench.edit import world_workload
from editd.bench.lifelong import run_lifelong, spread
from editd.config import Settings
from editd.models.factory import load_model
from editd.models.registry import BUILTIN
from editd.store.store import EditStore

pytestmark = pytest.mark.slow


def test_spread_takes_early_and_late_edits_alike():
    items = list(range(10))
    assert spread(items, 20) == items
    assert spread(items, 5) == [0, 2, 4, 6, 8]


def _two_sittings(tmp_path, *, seed, batch_size, between=lambda: None):
    """20 world edits as a long run does them: a first sitting stops after 10 (as a killed
    run would, at a batch boundary), `between` runs, and a second sitting resumes to 20.
    Returns the second sitting's result, the workload, and the store and curve paths."""
    settings = Settings()
    handle = load_model(settings, BUILTIN)
    work = world_workload(20, seed=seed, canary_size=50)
    store, curve = tmp_path / "store", tmp_path / "curve.jsonl"
    common = dict(
        algo="emmet", batch_size=batch_size, store_dir=store, curve_path=curve, curve_every=10
    )
    first = dataclasses.replace(work, requests=work.requests[:10])
    run_lifelong(handle, settings, work=first, **common)
    between()
    handle.reset()  # a new process: the handle serves the base until the store is opened
    return run_lifelong(handle, settings, work=work, **common), work, store, curve


def test_a_lifelong_run_resumes_from_its_store_and_extends_its_curve(tmp_path):
    result, work, store, curve = _two_sittings(tmp_path, seed=5, batch_size=5)
    points = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [p["edits"] for p in points] == [10, 20]
    assert [p["version"] for p in points] == [2, 4]
    assert result["edits"] == 20 and result["curve_points"] == 2
    for p in points:
        for key in ("es", "ps", "ns", "served_es", "canary_ratio"):
            assert 0.0 <= p[key] <= 1.5, (key, p)
    assert curve.with_suffix(".png").stat().st_size > 0
    with EditStore(store, readonly=True) as s:
        s.open()
        ids = [i for v in s.lineage()[1:] for i in s.version(v).fact_ids]
    assert sorted(ids) == sorted(f.fact_id for f in work.requests)  # each applied once
    assert result["es"] >= 0.5
    # The unedited model's figures are kept beside the store: a later sitting reads them.
    unedited = json.loads((tmp_path / "store.unedited.json").read_text())
    assert unedited["scores"]["es"] == result["es_base"]


def test_facts_per_second_counts_only_the_edits_it_timed(tmp_path):
    """A run stopped between a commit and its curve point lost that batch's editing time: the
    resumed run's facts/s must not credit those facts to the time it measured itself."""
    curve = tmp_path / "curve.jsonl"
    # The point of the first 10 edits never got written.
    result, *_ = _two_sittings(tmp_path, seed=6, batch_size=10, between=curve.unlink)
    (point,) = [json.loads(line) for line in curve.read_text().splitlines()]
    assert point["edits"] == 20
    # edit_seconds is written rounded to 0.1 s.
    seconds = point["edit_seconds"]
    assert 10 / (seconds + 0.05) <= point["facts_per_second"] <= 10 / max(seconds - 0.05, 1e-6)
    assert result["untimed_edits"] == 10
    assert result["facts_per_second"] == pytest.approx(10 / result["edit_seconds"])
