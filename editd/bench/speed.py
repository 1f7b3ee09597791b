"""`editd bench speed`: what editing costs on a model of a real shape, with random weights.

Speed does not depend on what the weights know, so a randomly initialised Llama of a published
shape (Llama-3-8B by default), built directly on the chosen device, measures what the editor
costs there: C0, keys, targets, solve and apply per batch, and peak memory. No checkpoint is
needed, which is what makes the measurement possible on a machine that cannot download one.
The requests come from the built-in world and are tokenized with the built-in tokenizer, whose
ids fit any Llama-3 vocabulary.

Scores would mean nothing and are not reported. Random weights rarely meet the target
optimisation's stopping rule, so targets run their full step budget: an upper bound on that
stage (`target_steps_mean` says how many steps were taken). For the same reason the quality
guards are off (`GUARDS_OFF`, reported as `guards`): a random model cannot realise its
targets, so a guard that judges an update by what it achieved would refuse every batch, and
the benchmark would measure nothing. What the guard itself costs (the post-edit check) is
still paid and timed (stage `check`).

Serving cost is measured too: the time per token of one forward pass over a fixed batch of
prompts, before the first edit and after the last. Edits are merged into the weights, so the
stored facts should add nothing per token; the two numbers show it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
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

# Settings of the guards that refuse an update on a random-weight model, all switched off here.
GUARDS_OFF = ("editing.max_update_ratio",)

SERVE_PROMPTS = 16  # prompts in the serving-cost batch
SERVE_REPEATS = 5  # forward passes timed; the median is reported


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


def serve_ms_per_token(handle: Any, prompts: list[str], device: torch.device) -> float:
    """Median milliseconds per token of one forward pass over `prompts`, as a reader sees it
    (after one untimed pass, which pays for allocation and kernel selection)."""
    batch = handle.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    tokens = int(batch["attention_mask"].sum())
    times = []
    for _ in range(SERVE_REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with handle.reading(), torch.no_grad():
            handle.model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1000 / tokens


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

    from editd.bench.edit import apply_sequentially, peak_rss_mb
    from editd.editing.editor import Editor, EditorConfig
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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    serve_prompts = [r.rendered_prompt for r in requests[:SERVE_PROMPTS]]
    serve_base = serve_ms_per_token(handle, serve_prompts, device)
    # A fresh cache: C0 of random weights is worth nothing later, and its cost is measured.
    # The handle has no checkpoint directory, so no model profile applies.
    with tempfile.TemporaryDirectory(prefix="editd-speed-") as cache:
        # Random weights have no text of their own; any fixed corpus measures C0's cost.
        corpus = builtin_world_corpus()
        editing = settings.editing.model_copy(update={"algo": algo})
        config = replace(EditorConfig.from_settings(editing), max_update_ratio=None)
        editor = Editor(
            handle, config, corpus=corpus, cache_dir=cache, progress=sys.stderr.isatty()
        )
        # The daemon's apply path on a throw-away store: commit, sha256, swap, preservation.
        with VersionedModel.temporary(handle, editor) as versioned:
            run = apply_sequentially(versioned, requests, batch_size)
            serve_edited = serve_ms_per_token(handle, serve_prompts, device)
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
        "swap_pause_seconds": run.swap_pauses,
        "target_steps_mean": run.target_steps_mean,
        "guards": "off",
        "guards_off": list(GUARDS_OFF),
        "serve_ms_per_token": {"base": serve_base, "edited": serve_edited},
        "serve_prompts": len(serve_prompts),
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
