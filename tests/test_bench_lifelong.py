"""`editd bench edit --store DIR --curve FILE`: a long run resumes where it stopped, on the
daemon's own store, and its curve holds one point per interval, none twice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from editd.bench.edit import world_workload
from editd.bench.lifelong import _untimed, run_lifelong, spread
from editd.config import Settings
from editd.models.factory import load_model
from editd.models.registry import BUILTIN
from editd.store.store import EditStore

pytestmark = pytest.mark.slow


def test_spread_takes_early_and_late_edits_alike():
    items = list(range(10))
    assert spread(items, 20) == items
    assert spread(items, 5) == [0, 2, 4, 6, 8]


def _two_sittings(tmp_path, *, seed, batch_size, between=lambda: None, ends=(10, 20)):
    """World edits as a long run does them: a first sitting stops after 10 (as a killed run
    would, at a batch boundary), `between` runs, and later sittings resume to each of `ends`.
    Returns the last sitting's result, the workload, and the store and curve paths."""
    settings = Settings()
    handle = load_model(settings, BUILTIN)
    work = world_workload(ends[-1], seed=seed, canary_size=50)
    store, curve = tmp_path / "store", tmp_path / "curve.jsonl"
    common = dict(
        algo="emmet", batch_size=batch_size, store_dir=store, curve_path=curve, curve_every=10
    )
    result = None
    for i, end in enumerate(ends):
        if i == 1:
            between()
        handle.reset()  # a new process: the handle serves the base until the store is opened
        sitting = dataclasses.replace(work, requests=work.requests[:end])
        result = run_lifelong(handle, settings, work=sitting, **common)
    return result, work, store, curve


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


def test_untimed_edits_stay_out_of_facts_per_second_in_every_later_sitting(tmp_path):
    """A curve whose first edits were never timed (here: their point was lost; in the long
    runs, a store copied from a shorter run) keeps them out of facts/s in every later
    sitting, not only in the one that found them."""
    curve = tmp_path / "curve.jsonl"
    result, *_ = _two_sittings(
        tmp_path, seed=7, batch_size=10, between=curve.unlink, ends=(10, 20, 30)
    )
    points = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [p["edits"] for p in points] == [20, 30]
    assert [p["untimed_edits"] for p in points] == [10, 10]
    last = points[-1]
    seconds = last["edit_seconds"]
    assert 20 / (seconds + 0.05) <= last["facts_per_second"] <= 20 / max(seconds - 0.05, 1e-6)
    assert result["untimed_edits"] == 10


def test_a_point_from_before_untimed_edits_were_recorded_says_them_through_its_rate():
    # The 7,700-edit curve's 3,000-edit point: 2,000 edits came with a copied store.
    old = {"edits": 3000, "facts_per_second": 0.7324281787793773, "edit_seconds": 1365.3}
    assert _untimed([old]) == 2000
    assert _untimed([{**old, "untimed_edits": 5}]) == 5
    assert _untimed([]) == 0


def test_a_refused_batch_is_rejected_as_the_daemon_rejects_it_and_the_run_goes_on(
    tmp_path, monkeypatch
):
    """An update the editor refuses (here: every batch holding one chosen fact) does not end a
    long run: as in the daemon, the batch is halved until the refusal is one fact's, that fact
    is set aside with the reason, the curve says how many, the facts beside it and later
    batches are applied, and a later sitting neither retries nor counts it as edited."""
    from editd.editing.editor import Editor
    from editd.editing.errors import UnrealisedUpdate

    work = world_workload(20, seed=8, canary_size=50)
    bad = work.requests[6].fact_id  # in the second batch of 5
    tried: list[list[str]] = []
    compute = Editor.compute_update

    def refusing(self, batch):
        ids = [f.fact_id for f in batch]
        tried.append(ids)
        if bad in ids:
            raise UnrealisedUpdate("the update would move a layer by 9 × its norm")
        return compute(self, batch)

    monkeypatch.setattr(Editor, "compute_update", refusing)
    result, work, store, curve = _two_sittings(tmp_path, seed=8, batch_size=5)
    points = [json.loads(line) for line in curve.read_text().splitlines()]
    assert [(p["edits"], p["rejected"]) for p in points] == [(10, 1), (20, 1)]
    assert result["rejected"] == 1
    refused = {bad}
    # The batch of 5, the half holding it (2 of 5), the fact alone; never again after that.
    assert [len(ids) for ids in tried if bad in ids] == [5, 2, 1]
    reasons = json.loads((tmp_path / "store.rejected.json").read_text())
    assert set(reasons) == refused
    assert all("9 × its norm" in why for why in reasons.values())
    with EditStore(store, readonly=True) as s:
        s.open()
        ids = [i for v in s.lineage()[1:] for i in s.version(v).fact_ids]
    assert sorted(ids) == sorted(f.fact_id for f in work.requests if f.fact_id not in refused)
