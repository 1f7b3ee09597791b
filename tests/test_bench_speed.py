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
def test_bench_speed_prints_one_json_object_with_per_batch_costs(tmp_path) -> None:
    args = ["--shape", "tiny", "--edits", "6", "--batch-size", "3", "--device", "cpu"]
    result = bench_json("speed", *args, home=tmp_path, timeout=300)
    assert (result["shape"], result["batch_size"], result["edits"], result["batches"]) == (
        "tiny",
        3,
        6,
        2,
    )
    assert len(result["batch_seconds"]) == 2 and all(s > 0 for s in result["batch_seconds"])
    assert result["stats_seconds"] > 0 and result["facts_per_second"] > 0
    assert set(result["stage_seconds"]) >= {"keys", "targets", "solve", "apply"}
    assert result["device"] == "cpu" and result["peak_device_memory_mb"] is None
    assert 0 < result["target_steps_mean"] <= 100
    # Nothing is left in the C0 cache of the user running it: random weights' C0 is thrown away.
    assert not (tmp_path / ".cache" / "editd").exists()
