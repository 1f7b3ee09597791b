"""`editd bench speed --json`: the editing cost on a random model of a given shape."""

from __future__ import annotations

import pytest
import torch
from bench_support import bench_json
from transformers import AutoTokenizer

from editd.bench.speed import SHAPES, random_llama
from editd.world.builtin import builtin_model_dir


def test_published_shapes_hold_every_token_id_of_the_built_in_tokenizer() -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    for name, shape in SHAPES.items():
        assert (shape["vocab_size"] or len(tokenizer)) >= len(tokenizer), name
    model = random_llama("tiny", torch.device("cpu"), torch.bfloat16, tokenizer, seed=0)
    assert model.config.vocab_size == len(tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_bench_speed_at_its_defaults_times_every_stage_with_the_quality_guards_off(
    tmp_path,
) -> None:
    # The defaults are the GPU script's (300 edits in batches of 100); only the shape is small.
    # A random model realises none of its targets, so with the guards on it stops at batch 1.
    result = bench_json("speed", "--shape", "tiny", home=tmp_path, timeout=600)
    assert (result["shape"], result["batch_size"], result["edits"], result["batches"]) == (
        "tiny",
        100,
        300,
        3,
    )
    assert result["guards"] == "off" and result["guards_off"] == ["editing.max_update_ratio"]
    assert len(result["batch_seconds"]) == 3 and all(s > 0 for s in result["batch_seconds"])
    assert len(result["swap_pause_seconds"]) == 3
    assert all(s >= 0 for s in result["swap_pause_seconds"])
    assert result["stats_seconds"] > 0 and result["facts_per_second"] > 0
    stages = result["stage_seconds"]
    assert set(stages) == {"keys", "targets", "solve", "check", "store", "apply"}
    assert all(stages[s] > 0 for s in ("keys", "targets", "solve", "store", "apply"))
    assert all(result["serve_ms_per_token"][k] > 0 for k in ("base", "edited"))
    assert result["peak_rss_mb"] > 0
    if result["device"] == "cpu":
        assert result["peak_device_memory_mb"] is None
    else:
        assert result["peak_device_memory_mb"] > result["model_mb"]
    assert 0 < result["target_steps_mean"] <= 100
    # Nothing is left in the C0 cache of the user running it: random weights' C0 is thrown away.
    assert not (tmp_path / ".cache" / "editd").exists()
