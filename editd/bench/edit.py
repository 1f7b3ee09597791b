"""`editd bench edit`: sequential batched editing of world requests, scored after the last batch.

N counterfactual requests from the world generator are written into the built-in model (or a
given one) in batches of B, each batch through the same path the daemon takes: compute the
update on the current model, add its factors to the accumulated float32 delta, serve
`base + delta`, and commit the batch's keys so later batches preserve it. Scores are taken once,
after the last batch, over all N requests, so early edits count only if they survived the later
ones. The canary is the greedy accuracy on facts of subjects no request touches, in the template
each subject never saw in training, before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editd.config import Settings
from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.scoring import FactLogprobs, canary_accuracy, fact_logprobs, summarize
from editd.facts import FactUpdate

log = logging.getLogger(__name__)

CANARY_SIZE = 500
STAGES = ("keys", "targets", "solve", "check")


@dataclass
class EditRun:
    """What one sequence of batches did: timings per stage and per-batch edit diagnostics."""

    seconds: float = 0.0
    stats_seconds: float = 0.0
    apply_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: int = 0
    batch_seconds: list[float] = field(default_factory=list)  # compute, apply and commit
    target_prob: list[float] = field(default_factory=list)
    target_steps: list[float] = field(default_factory=list)
    post_top1: list[float] = field(default_factory=list)

    @property
    def target_steps_mean(self) -> float:
        return sum(self.target_steps) / len(self.target_steps) if self.target_steps else 0.0


def model_dir(model: Path | None) -> Path:
    from editd.world.builtin import builtin_model_dir

    return model or builtin_model_dir()


def load_handle(model: Path | None, settings: Settings) -> ModelHandle:
    return ModelHandle.load(
        model_dir(model),
        device=settings.model.device,
        dtype=settings.model.dtype,
        module_template=settings.editing.module_template,
    )


def make_editor(
    handle: ModelHandle, settings: Settings, algo: str, *, cache_dir: str | Path | None = None
) -> Editor:
    """The editor the settings describe, with `algo`; C0 cached in `cache_dir` if given, else
    where `editing.stats_cache` says."""
    editing = settings.editing.model_copy(update={"algo": algo})
    config = EditorConfig.from_settings(editing, handle.path)
    corpus = None
    if settings.editing.stats_corpus is not None:
        from editd.editing.stats import Corpus

        corpus = Corpus.from_path(settings.editing.stats_corpus)
    return Editor(
        handle,
        config,
        corpus=corpus,
        cache_dir=cache_dir or settings.editing.stats_cache,
        progress=sys.stderr.isatty(),
    )


def apply_sequentially(
    handle: ModelHandle,
    editor: Editor,
    requests: Sequence[FactUpdate],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> EditRun:
    """Edit `requests` in order, `batch_size` at a time, starting from the base weights.

    The handle's served deltas are replaced by this run's; the editor's preservation state is
    the caller's to reset (`reset`) when a run must not preserve earlier runs' keys.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    run = EditRun()
    run.stats_seconds = editor.prepare()
    deltas: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for lo in range(0, len(requests), batch_size):
        batch = requests[lo : lo + batch_size]
        began = time.perf_counter()
        update = editor.compute_update(batch)
        t = time.perf_counter()
        for name, layer in update.layers.items():
            dense = layer.dense().float()  # (d_out, d_in)
            deltas[name] = deltas[name] + dense if name in deltas else dense
        handle.set_deltas(deltas)
        editor.commit(update)
        run.apply_seconds += time.perf_counter() - t
        run.batch_seconds.append(time.perf_counter() - began)
        diag: dict[str, Any] = dict(update.diagnostics)
        for stage in STAGES:
            run.stages[stage] += float(diag.get("seconds", {}).get(stage, 0.0))
        run.target_prob += [float(p) for p in diag.get("target_prob", [])]
        run.target_steps += [float(n) for n in diag.get("target_steps", [])]
        run.post_top1.append(float(diag.get("post_top1", float("nan"))))
        run.batches += 1
        if on_batch is not None:
            on_batch(lo + len(batch), len(requests))
    run.seconds = time.perf_counter() - start
    return run


def reset(handle: ModelHandle, editor: Editor) -> None:
    """Back to the base model with nothing preserved beyond C0."""
    handle.reset()
    editor.reset_to([])


def canary_set(
    requests: Sequence[FactUpdate], n: int = CANARY_SIZE, seed: int = 0
) -> tuple[list[str], list[str]]:
    from editd.world.requests import unedited_examples

    pairs = unedited_examples(list(requests), n, seed=seed)
    return [p for p, _ in pairs], [o for _, o in pairs]


def score(handle: ModelHandle, requests: Sequence[FactUpdate]) -> list[FactLogprobs]:
    with handle.reading():
        return fact_logprobs(handle.model, handle.tokenizer, requests)


def canary(handle: ModelHandle, prompts: Sequence[str], objects: Sequence[str]) -> float:
    with handle.reading():
        return canary_accuracy(handle.model, handle.tokenizer, prompts, objects)


def json_ready(value: Any) -> Any:
    """NaN (a score with nothing to score) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def print_result(result: dict[str, Any], *, as_json: bool) -> None:
    """One JSON object on one line (NaN as null), or aligned `key value` lines for people."""
    if as_json:
        print(json.dumps(json_ready(result), allow_nan=False))
        return
    for key, value in result.items():
        print(f"{key:24s} {value}")


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(
    handle: ModelHandle,
    settings: Settings,
    *,
    algo: str,
    batch_size: int,
    edits: int,
    seed: int,
    canary_size: int = CANARY_SIZE,
) -> dict[str, Any]:
    from editd.world.requests import make_requests

    requests = make_requests(edits, seed)
    prompts, objects = canary_set(requests, canary_size, seed)
    base_canary = canary(handle, prompts, objects)
    editor = make_editor(handle, settings, algo)
    run = apply_sequentially(
        handle,
        editor,
        requests,
        batch_size,
        on_batch=lambda done, total: log.info("edited %d/%d facts", done, total),
    )
    t = time.perf_counter()
    scores = summarize(score(handle, requests))
    after_canary = canary(handle, prompts, objects)
    scoring_seconds = time.perf_counter() - t
    return {
        "algo": algo,
        "batch_size": batch_size,
        "edits": edits,
        "seed": seed,
        "es": scores.es,
        "ps": scores.ps,
        "ns": scores.ns,
        "s": scores.s,
        "es_magnitude": scores.es_magnitude,
        "ps_magnitude": scores.ps_magnitude,
        "ns_magnitude": scores.ns_magnitude,
        "heldout_accuracy": after_canary,
        "heldout_accuracy_base": base_canary,
        "heldout_ratio": after_canary / base_canary if base_canary else float("nan"),
        "canary_facts": len(prompts),
        "seconds": run.seconds,
        "facts_per_second": edits / run.seconds if run.seconds > 0 else float("nan"),
        "stats_seconds": run.stats_seconds,
        "scoring_seconds": scoring_seconds,
        "stage_seconds": {**run.stages, "apply": run.apply_seconds},
        "batches": run.batches,
        "target_prob_mean": sum(run.target_prob) / len(run.target_prob),
        "target_prob_min": min(run.target_prob),
        "post_top1_mean": sum(run.post_top1) / len(run.post_top1),
        "peak_rss_mb": peak_rss_mb(),
        "model": handle.identity,
        "device": str(handle.device),
        "dtype": str(handle.dtype).removeprefix("torch."),
        "layers": list(editor.modules),
        "threads": torch.get_num_threads(),
    }


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.edits <= 0 or args.batch_size <= 0:
        print("editd bench edit: --edits and --batch-size must be positive", file=sys.stderr)
        return 2
    handle = load_handle(args.model, settings)
    result = run_bench(
        handle,
        settings,
        algo=args.algo,
        batch_size=args.batch_size,
        edits=args.edits,
        seed=args.seed,
    )
    print_result(result, as_json=args.json)
    return 0
