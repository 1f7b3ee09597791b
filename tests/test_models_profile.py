"""`editd model profile`: the edit layers come from a causal trace and a measured grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editd.bench.profile import candidate_windows

pytestmark = pytest.mark.slow


def test_candidates_are_the_traced_window_and_memits_recipe() -> None:
    effects = [0.9, 0.1, 0.5, 0.6, 0.2, 0.0]
    # Layer 0 is left out however strong: it mostly builds token identity.
    assert candidate_windows(effects, list(range(6)), [1, 2], 2) == [[2, 3], [1, 2]]
    assert candidate_windows(effects, list(range(6)), [2, 3], 2) == [[2, 3]]


def test_profile_writes_the_best_grid_point_with_its_evidence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from editd.cli import main
    from editd.world.requests import make_requests

    # The built-in model and its world's facts stand in for a real model and CounterFact:
    # the procedure is the same, only the sizes are small.
    dataset = tmp_path / "facts.jsonl"
    dataset.write_text("".join(f.model_dump_json() + "\n" for f in make_requests(2000, seed=3)))
    out = tmp_path / "editd.json"
    # A small C0 budget: the layers the trace picks are not the ones the session cache holds.
    monkeypatch.setenv("EDITD_EDITING__STATS_TOKENS", "4096")
    # At the subject in layers 1-2 the 9M toy moves by ~100 × its norm at λ 30 (its own
    # profile edits layers 3-5 at the prompt's end); the guard is not what this tests.
    monkeypatch.setenv("EDITD_EDITING__MAX_UPDATE_RATIO", "1000")
    args = ["model", "profile", "builtin", "--dataset", str(dataset), "--facts", "4"]
    args += ["--window", "2", "--lambdas", "30", "--clamps", "4", "--out", str(out)]
    assert main(args) == 0
    profile = json.loads(out.read_text())
    grid = profile["evidence"]["grid"]
    assert len(grid) in (1, 2)  # one or two windows, one λ, one clamp
    best = max(grid, key=lambda r: r["objective"])
    assert profile["editing"]["layers"] == best["layers"]
    assert profile["editing"]["mom2_weight"] == best["mom2_weight"]
    trace = profile["evidence"]["trace"]
    assert len(trace["mlp_effect"]) == len(trace["layers"]) and trace["facts"] > 0
    assert any("refused" not in row for row in grid)
    for row in grid:
        # A window whose update would wreck the model is kept as a refused candidate.
        assert 0 <= row["objective"] <= 1 and ("refused" in row or 0 <= row["canary_ratio"] <= 1)
    # The gated memory's threshold was measured, on facts neither the trace nor the grid saw.
    gate = profile["evidence"]["gate"]
    assert profile["editing"]["gate_threshold"] in [r["threshold"] for r in gate["separation"]]
    for row in gate["separation"]:
        assert 0 <= row["text_fires"] <= 1 and row["facts"] > 0 and row["text_tokens"] > 0
