"""The batch-size study at a size that fits the suite: plan, points, JSON and PNG."""

from __future__ import annotations

import argparse
import json
import struct

import pytest

from editd.bench.study import StudyPlan, plan_from_args, plot, table


def test_plan_repeats_small_batches_up_to_min_facts():
    plan = StudyPlan(batch_sizes=(1, 16, 64, 256), min_facts=64, sequential_total=100)
    assert [plan.repeats(b) for b in (1, 16, 64, 256)] == [64, 4, 1, 1]
    assert plan.pool_size == 256
    with pytest.raises(ValueError):
        StudyPlan(batch_sizes=(0,))


def test_plan_from_cli_flags():
    args = argparse.Namespace(
        algos="emmet",
        batch_sizes="1,4",
        min_facts=4,
        sequential_total=8,
        sequential_batch_sizes="2,8",
        canary_size=10,
        seed=3,
    )
    plan = plan_from_args(args)
    assert plan == StudyPlan(
        algos=("emmet",),
        batch_sizes=(1, 4),
        min_facts=4,
        sequential_total=8,
        sequential_batch_sizes=(2, 8),
        canary_size=10,
        seed=3,
    )


def _point(kind: str, algo: str, b: int, v: float) -> dict:
    return {
        "experiment": kind,
        "algo": algo,
        "batch_size": b,
        "es": v,
        "ps": v / 2,
        "ns": 1 - v / 4,
        "s": v / 3,
        "heldout_accuracy": 0.9,
        "edits": 64,
        "facts_per_second": 1.5,
    }


def _result() -> dict:
    points = [
        _point(kind, algo, b, 0.2 + 0.1 * i)
        for kind in ("batch", "sequential")
        for algo in ("memit", "emmet")
        for i, b in enumerate((1, 16, 64))
    ]
    return {
        "plan": {"algos": ["memit", "emmet"], "sequential_total": 64},
        "heldout_accuracy_base": 0.95,
        "points": points,
    }


def test_table_has_a_row_per_point():
    lines = table(_result()).splitlines()
    rows = [line for line in lines if line.startswith("| batch") or line.startswith("| seq")]
    assert len(rows) == 12
    assert rows[0] == "| batch | memit | 1 | 64 | 0.200 | 0.100 | 0.950 | 0.067 | 0.900 | 1.50 |"
    assert lines[-1].endswith("0.950.")


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "study.png"
    plot(_result(), path)
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 400 and height > 300


@pytest.mark.slow
def test_quick_study_on_the_builtin_model(tmp_path):
    from editd.bench.study import run_study, write_results
    from editd.config import Settings
    from editd.models.factory import load_model
    from editd.models.registry import BUILTIN

    settings = Settings()
    plan = StudyPlan(
        algos=("memit", "emmet"),
        batch_sizes=(1, 4),
        min_facts=2,
        sequential_total=4,
        sequential_batch_sizes=(2, 4),
        canary_size=20,
    )
    handle = load_model(settings, BUILTIN)
    seen = []
    result = run_study(handle, settings, plan, emit=seen.append)
    json_path, png_path = write_results(result, tmp_path)
    saved = json.loads(json_path.read_text())
    assert png_path.stat().st_size > 1000
    assert len(saved["points"]) == len(seen) == 2 * (2 + 2)
    by = {(p["experiment"], p["algo"], p["batch_size"]): p for p in saved["points"]}
    assert by[("batch", "emmet", 1)]["edits"] == 2 and by[("batch", "emmet", 1)]["repeats"] == 2
    assert by[("sequential", "memit", 2)]["batches"] == 2
    # One sequential batch of all 4 facts is the one-batch run of 4, reused rather than redone.
    whole = by[("sequential", "emmet", 4)]
    assert whole["batches"] == 1 and whole["es"] == by[("batch", "emmet", 4)]["es"]
    for p in saved["points"]:
        for key in ("es", "ps", "ns", "s", "heldout_accuracy"):
            assert 0.0 <= p[key] <= 1.0
    # The served model is back to its base weights after the study.
    assert not handle._edited
