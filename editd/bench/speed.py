"""`editd bench speed`: what editing costs on a model of a real shape, with random weights.

Speed does not depend on what the weights know, so a randomly initialised Llama of a published
shape (Llama-3-8B by default), built directly on the chosen device, measures what the editor
costs there: C0, keys, targets, solve and apply per batch, and peak memory. No checkpoint is
needed, which is what makes the measurement possible on a machine that cannot download one.
The requests come from the built-in world and are tokenized with the built-in tokenizer, whose
ids fit any Llama-3 vocabulary.

Scores would mean nothing and are not reported. Random weights rarely meet the target
optimisation's stopping rule, so targets run their full step budget: an upper bound on that
stage (`target_steps_mean` says how many steps were taken).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import torch

from editd.config import Settings
from editd.exitcodes import EXIT_OK, EXIT_USAGE

# Published geometries (config.json of the Meta checkpoints), and a tiny one for tests.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "llama3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": None,  # the tokenizer's
        "tie_word_embeddings": False,
    },
}


def random_llama(shape: str, device: torch.device, dtype: torch.dtype, tokenizer: Any, seed: int):
    """A `LlamaForCausalLM` of `shape` with random weights, allocated on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    geometry = dict(SHAPES[shape])
    geometry["vocab_size"] = geometry["vocab_size"] or len(tokenizer)
    if geometry["vocab_size"] < len(tokenizer):
        raise ValueError(f"shape {shape!r} has fewer token ids than the tokenizer")
    config = LlamaConfig(
        **geometry,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def run_speed(
    settings: Settings,
    *,
    shape: str,
    algo: str,
    batch_size: int,
    edits: int,
    seed: int = 0,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from editd.bench.edit import apply_sequentially, make_editor, peak_rss_mb
    from editd.editing.model import ModelHandle, resolve_device, resolve_dtype
    from editd.editing.stats import default_budget
    from editd.models.corpus import builtin_world_corpus
    from editd.versions import VersionedModel
    from editd.world.builtin import builtin_model_dir
    from editd.world.requests import make_requests

    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device, None)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    t = time.perf_counter()
    model = random_llama(shape, device, dtype, tokenizer, seed)
    build_seconds = time.perf_counter() - t
    handle = ModelHandle(model=model, tokenizer=tokenizer, identity=f"random-{shape}-{seed}")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    requests = make_requests(edits, seed)
    # A fresh cache: C0 of random weights is worth nothing later, and its cost is measured.
    # The handle has no checkpoint directory, so no model profile applies.
    with tempfile.TemporaryDirectory(prefix="editd-speed-") as cache:
        # Random weights have no text of their own; any fixed corpus measures C0's cost.
        corpus = builtin_world_corpus()
        editor = make_editor(handle, settings, algo, cache_dir=cache, corpus=corpus)
        # The daemon's apply path on a throw-away store: commit, sha256, swap, preservation.
        with VersionedModel.temporary(handle, editor) as versioned:
            run = apply_sequentially(versioned, requests, batch_size)
    d_in = handle.weight(editor.modules[0]).shape[1]
    return {
        "shape": shape,
        "algo": algo,
        "batch_size": batch_size,
        "edits": edits,
        "batches": run.batches,
        "layers": list(editor.modules),
        "params": sum(p.numel() for p in model.parameters()),
        "model_mb": model_mb,
        "build_seconds": build_seconds,
        "stats_seconds": run.stats_seconds,
        "stats_tokens": editor.config.stats_tokens or default_budget(d_in),
        "seconds": run.seconds,
        "facts_per_second": edits / run.seconds if run.seconds > 0 else float("nan"),
        "batch_seconds": run.batch_seconds,
        "stage_seconds": dict(run.stages),
        "target_steps_mean": run.target_steps_mean,
        "peak_device_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(args: argparse.Namespace, settings: Settings) -> int:
    from editd.bench.edit import print_result

    if args.edits <= 0 or args.batch_size <= 0:
        print("editd bench speed: --edits and --batch-size must be positive", file=sys.stderr)
        return EXIT_USAGE
    updates = {k: v for k, v in {"device": args.device, "dtype": args.dtype}.items() if v}
    settings = settings.model_copy(update={"model": settings.model.model_copy(update=updates)})
    result = run_speed(
        settings,
        shape=args.shape,
        algo=args.algo,
        batch_size=args.batch_size,
        edits=args.edits,
        seed=args.seed,
    )
    print_result(result, as_json=args.json)
    return EXIT_OK
