"""The shipped built-in model: a real Llama that knows its world, loaded like any HF checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from editd.world.builtin import builtin_model_dir
from editd.world.evaluate import evaluate_model

# The accuracy test scores a fixed random sample of each split; the README reports the figures
# of `editd model score` over every fact.
SAMPLE = 1500


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return builtin_model_dir()


def test_loads_through_the_generic_hugging_face_path(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.num_hidden_layers >= 6
    assert cfg.hidden_act == "silu"  # SwiGLU MLP: gate, up and down projections
    assert hasattr(model.model.layers[0].mlp, "gate_proj")
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert cfg.rope_parameters["rope_type"] == "default"
    assert tokenizer.bos_token_id is not None
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    assert size <= 20 * 2**20, f"shipped model is {size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_knows_its_world(model_dir: Path) -> None:
    result = evaluate_model(model_dir, limit=SAMPLE)
    assert result["facts"] >= 10_000
    assert result["train_accuracy"] >= 0.98, result
    assert result["heldout_template_accuracy"] >= 0.90, result
    assert result["train_multitoken_accuracy"] >= 0.98, result
    assert result["heldout_template_multitoken_accuracy"] >= 0.90, result


def test_model_score_cli_prints_one_json_object() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "editd", "model", "score", "--json", "--limit", "100"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    assert {"params", "facts", "train_accuracy", "heldout_template_accuracy"} <= set(result)
