"""`editd bench edit`: sequential batched editing of world requests, scored after the last batch.

N counterfactual requests from the world generator are written into the built-in model (or a
given one) in batches of B, each batch through the daemon's own path: the update is computed on
the served model and applied by `VersionedModel.apply` on a temporary edit store (durable
commit, sha256 of every edited tensor, swap, preservation of its keys), so the timings include
the store and what is scored is what the daemon would serve. Scores are taken once,
after the last batch, over all N requests, so early edits count only if they survived the later
ones. The canary is the greedy accuracy on facts of subjects no request touches, in the template
each subject never saw in training, before and after.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editd.config import Settings
from editd.editing.errors import Uneditable, worth_splitting
from editd.editing.model import ModelHandle
from editd.editing.scoring import FactLogprobs, canary_accuracy, fact_logprobs, summarize
from editd.facts import FactUpdate
from editd.models.factory import make_editor
from editd.versions import VersionedModel

log = logging.getLogger(__name__)

CANARY_SIZE = 500
STAGES = ("keys", "targets", "solve", "check", "store", "apply")


@dataclass
class EditRun:
    """What one sequence of batches did: timings per stage and per-batch edit diagnostics."""

    seconds: float = 0.0
    stats_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: int = 0
    batch_seconds: list[float] = field(default_factory=list)  # compute, store, swap, preserve
    swap_pauses: list[float] = field(default_factory=list)  # seconds readers waited, per batch
    target_prob: list[float] = field(default_factory=list)
    target_steps: list[float] = field(default_factory=list)
    post_top1: list[float] = field(default_factory=list)
    # fact id → why its batch was refused (`reject=True`): what the daemon sends to
    # facts.rejected.
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def target_steps_mean(self) -> float:
        return sum(self.target_steps) / len(self.target_steps) if self.target_steps else 0.0


def apply_sequentially(
    model: VersionedModel,
    requests: Sequence[FactUpdate],
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
    *,
    reject: bool = False,
) -> EditRun:
    """Edit `requests` in order, `batch_size` at a time, on top of what `model` serves.

    A batch the editor refuses (`Uneditable`: an update that would wreck a layer, facts with no
    position to edit) raises, unless `reject`: then, as in the daemon, it is retried in halves
    down to single facts (`worth_splitting`), each part that passes is applied as its own
    version, the facts still refused are recorded in `EditRun.rejected` with the reason, and the
    next batch goes on.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    editor = model.editor
    if editor is None:
        raise ValueError("the versioned model has no editor")
    run = EditRun()
    run.stats_seconds = editor.prepare()

    def edit(batch: Sequence[FactUpdate]) -> None:
        began = time.perf_counter()
        try:
            update = editor.compute_update(batch)
        except Uneditable as exc:
            if not reject:
                raise
            run.batch_seconds.append(time.perf_counter() - began)
            if worth_splitting(exc, len(batch)):
                log.warning("edit of %d facts refused (%s); splitting", len(batch), exc)
                half = len(batch) // 2
                edit(batch[:half])
                edit(batch[half:])
                return
            log.error("edit of %d facts refused: %s", len(batch), exc)
            run.rejected.update({f.fact_id: f"edit failed: {exc}" for f in batch})
            return
        diag: dict[str, Any] = dict(update.diagnostics)
        applied = model.apply(update, batch, timings=diag.get("seconds", {}))
        run.batch_seconds.append(time.perf_counter() - began)
        run.swap_pauses.append(applied.pause)
        seconds = {**diag.get("seconds", {}), **applied.seconds}
        for stage in STAGES:
            run.stages[stage] += float(seconds.get(stage, 0.0))
        run.target_prob += [float(p) for p in diag.get("target_prob", [])]
        run.target_steps += [float(n) for n in diag.get("target_steps", [])]
        run.post_top1.append(float(diag.get("post_top1", float("nan"))))
        run.batches += 1

    start = time.perf_counter()
    for lo in range(0, len(requests), batch_size):
        batch = requests[lo : lo + batch_size]
        edit(batch)
        if on_batch is not None:
            on_batch(lo + len(batch), len(requests))
    run.seconds = time.perf_counter() - start
    return run


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


@dataclass(frozen=True)
class Workload:
    """What a benchmark edits and how it checks the rest of the model."""

    requests: list[FactUpdate]
    canary_prompts: list[str]
    canary_objects: list[str]
    known: list[FactUpdate] = field(default_factory=list)  # facts the base model gets right
    texts: list[str] = field(default_factory=list)  # held-out text for perplexity
    source: str = "builtin-world"


KNOWN_FACTS = 64
PERPLEXITY_TEXTS = 200


def world_workload(edits: int, seed: int, canary_size: int = CANARY_SIZE) -> Workload:
    """The built-in world's requests, and its unedited facts as the canary."""
    from editd.world.requests import make_requests

    requests = make_requests(edits, seed)
    prompts, objects = canary_set(requests, canary_size, seed)
    return Workload(requests, prompts, objects)


def dataset_workload(
    handle: ModelHandle, dataset: Path, edits: int, seed: int, text: Path | None = None
) -> Workload:
    """`edits` records of a real dataset (its evaluation split, drawn by `seed`); the canary is
    the model's own answers to the shipped prompts; `known` are other records whose true
    object the unedited model prefers, re-checked after editing."""
    from editd.bench.data import draw, load_dataset, others_for_known, split
    from editd.editing.scoring import canary_pairs
    from editd.monitoring.canary import canary_prompts

    facts = load_dataset(dataset)
    requests = draw(split(facts, "eval"), edits, seed)
    others = others_for_known(facts, requests, 4 * KNOWN_FACTS, seed + 1)
    with handle.reading():
        prompts, objects = canary_pairs(handle.model, handle.tokenizer, canary_prompts())
        scored = fact_logprobs(handle.model, handle.tokenizer, others)
    known = [f for f, lp in zip(others, scored, strict=True) if prefers_true(lp)][:KNOWN_FACTS]
    texts = prose_lines(text)[:PERPLEXITY_TEXTS] if text is not None else []
    return Workload(requests, prompts, objects, known, texts, source=str(dataset))


def prose_lines(path: str | Path) -> list[str]:
    """A WikiText-style file's prose: lines of 8 words or more, without the " = Title = "
    headings. The first `PERPLEXITY_TEXTS` are what the benchmarks score perplexity on."""
    lines = (t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines())
    return [t for t in lines if len(t.split()) >= 8 and not t.startswith("=")]


def prefers_true(lp: FactLogprobs) -> bool:
    """Whether the model prefers the true object over the counterfactual on the edit prompt."""
    new, true = lp.edit[0]
    return true > new


def known_kept(handle: ModelHandle, known: Sequence[FactUpdate]) -> float:
    """Share of `known` whose true object is still preferred over the counterfactual."""
    if not known:
        return float("nan")
    return sum(map(prefers_true, score(handle, known))) / len(known)


def served(handle: ModelHandle, requests: Sequence[FactUpdate]) -> dict[str, float]:
    from editd.editing.scoring import served_accuracy

    with handle.reading():
        s = served_accuracy(handle.model, handle.tokenizer, requests)
    return {"es": s.es, "ps": s.ps, "ns": s.ns, "ns_true": s.ns_true}


def perplexity(handle: ModelHandle, texts: Sequence[str]) -> float:
    from editd.editing.scoring import heldout_perplexity

    if not texts:
        return float("nan")
    with handle.reading():
        return heldout_perplexity(handle.model, handle.tokenizer, texts)


def _ratio(after: float, before: float) -> float:
    return after / before if before and math.isfinite(before) else float("nan")


def run_bench(
    handle: ModelHandle,
    settings: Settings,
    *,
    algo: str,
    batch_size: int,
    edits: int,
    seed: int,
    workload: Workload | None = None,
) -> dict[str, Any]:
    work = workload or world_workload(edits, seed)
    requests = work.requests
    base_canary = canary(handle, work.canary_prompts, work.canary_objects)
    base_scores = summarize(score(handle, requests))
    base_served = served(handle, requests)
    base_ppl = perplexity(handle, work.texts)
    base_known = known_kept(handle, work.known)
    editor = make_editor(handle, settings, algo=algo)
    with VersionedModel.temporary(handle, editor) as model:
        run = apply_sequentially(
            model,
            requests,
            batch_size,
            on_batch=lambda done, total: log.info("edited %d/%d facts", done, total),
        )
        t = time.perf_counter()
        scores = summarize(score(handle, requests))
        after_canary = canary(handle, work.canary_prompts, work.canary_objects)
        after_served = served(handle, requests)
        after_ppl = perplexity(handle, work.texts)
        after_known = known_kept(handle, work.known)
        scoring_seconds = time.perf_counter() - t
    return {
        "algo": algo,
        "batch_size": batch_size,
        "edits": edits,
        "seed": seed,
        "dataset": work.source,
        "es": scores.es,
        "ps": scores.ps,
        "ns": scores.ns,
        "s": scores.s,
        "es_base": base_scores.es,
        "ps_base": base_scores.ps,
        "ns_base": base_scores.ns,
        "es_magnitude": scores.es_magnitude,
        "ps_magnitude": scores.ps_magnitude,
        "ns_magnitude": scores.ns_magnitude,
        # What greedy generation says: the figure a user sees.
        "served_es": after_served["es"],
        "served_ps": after_served["ps"],
        "served_ns": after_served["ns"],
        "served_ns_true": after_served["ns_true"],
        "served_ns_true_base": base_served["ns_true"],
        "canary": after_canary,
        "canary_base": base_canary,
        "canary_ratio": _ratio(after_canary, base_canary),
        "canary_prompts": len(work.canary_prompts),
        "known_facts": len(work.known),
        "known_kept": after_known,
        "known_kept_base": base_known,
        "perplexity": after_ppl,
        "perplexity_base": base_ppl,
        "perplexity_ratio": _ratio(after_ppl, base_ppl),
        # The names earlier runs used for the canary, kept so their JSON compares.
        "heldout_accuracy": after_canary,
        "heldout_accuracy_base": base_canary,
        "heldout_ratio": _ratio(after_canary, base_canary),
        "canary_facts": len(work.canary_prompts),
        "seconds": run.seconds,
        "facts_per_second": edits / run.seconds if run.seconds > 0 else float("nan"),
        "stats_seconds": run.stats_seconds,
        "scoring_seconds": scoring_seconds,
        "stage_seconds": dict(run.stages),
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
