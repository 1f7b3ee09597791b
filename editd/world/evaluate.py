"""`editd model score`: how well the built-in model knows its world."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editd.config import Settings
from editd.world.builtin import builtin_model_dir
from editd.world.train import continuation_accuracy, encode_examples
from editd.world.world import load_world


def evaluate_model(model_dir: Path, limit: int | None = None, seed: int = 0) -> dict[str, object]:
    """Top-1 accuracy of whole objects: the greedy continuation is exactly " object."."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    world = load_world()
    rng = random.Random(seed)
    splits = {"train": world.training_examples(), "heldout_template": world.heldout_examples()}
    result: dict[str, object] = {
        "params": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "intermediate_size": model.config.intermediate_size,
        "vocab_size": model.config.vocab_size,
        "size_mb": round(
            sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20, 2
        ),
        "subjects": len(world.subjects),
        "relations": len(world.relations),
        "facts": len(world.facts()),
    }
    for name, examples in splits.items():
        if limit is not None and limit < len(examples):
            examples = rng.sample(examples, limit)
        multi = [
            e
            for e in examples
            if len(tokenizer(" " + e[1], add_special_tokens=False)["input_ids"]) > 1
        ]
        pad = tokenizer.pad_token_id
        result[f"{name}_accuracy"] = continuation_accuracy(
            model, encode_examples(tokenizer, examples), pad
        )
        result[f"{name}_multitoken_accuracy"] = continuation_accuracy(
            model, encode_examples(tokenizer, multi), pad
        )
        result[f"{name}_examples"] = len(examples)
        result[f"{name}_multitoken_examples"] = len(multi)
    return result


def main(args: argparse.Namespace, settings: Settings) -> int:
    result = evaluate_model(args.model or builtin_model_dir(), limit=args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36s} {value}")
    return 0
