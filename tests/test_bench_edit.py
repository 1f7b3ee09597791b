"""`editd bench edit --json` end to end on the built-in model, at a size that fits the suite."""

from __future__ import annotations

import pytest
from bench_support import bench_json

from editd.bench.edit import json_ready

KEYS = {
    "algo",
    "batch_size",
    "edits",
    "es",
    "ps",
    "ns",
    "s",
    "heldout_accuracy",
    "heldout_accuracy_base",
    "seconds",
    "facts_per_second",
    "stats_seconds",
    "peak_rss_mb",
    "stage_seconds",
}


def test_json_ready_turns_nan_into_null():
    out = json_ready({"a": float("nan"), "b": [1.0, float("inf")], "c": "x", "d": 2})
    assert out == {"a": None, "b": [1.0, None], "c": "x", "d": 2}


@pytest.mark.slow
def test_bench_edit_prints_one_json_object_with_scores_in_range(tmp_path):
    # HOME is a fresh directory: C0 comes from the session cache (conftest).
    args = ["--algo", "emmet", "--edits", "6", "--batch-size", "3", "--seed", "1"]
    result = bench_json("edit", *args, home=tmp_path)
    assert set(result) >= KEYS
    assert (result["algo"], result["batch_size"], result["edits"]) == ("emmet", 3, 6)
    assert result["batches"] == 2
    for key in ("es", "ps", "ns", "s", "heldout_accuracy", "heldout_accuracy_base"):
        assert 0.0 <= result[key] <= 1.0, key
    # The built-in model knows its world: the canary starts high.
    assert result["heldout_accuracy_base"] >= 0.8
    assert result["seconds"] > 0 and result["facts_per_second"] > 0
    assert result["stats_seconds"] > 0 and result["peak_rss_mb"] > 0
    assert set(result["stage_seconds"]) >= {"keys", "targets", "solve", "apply"}
    # Six edits on a model that knows its facts: efficacy well above chance.
    assert result["es"] >= 0.5
