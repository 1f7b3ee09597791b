"""`editd bench edit --store DIR --curve FILE`: lifelong editing, resumable, with a curve.

The same sequential protocol as `editd bench edit` (every batch through `VersionedModel.apply`),
but on an edit store that survives the process: a run of thousands of edits (hours of CPU) is
continued by running the same command again, which skips the facts the store already holds.
The unedited model's figures are measured before the store is opened (the handle serves the
base until then), so a resumed run compares against the same base.

Every `--curve-every` edits (at a batch boundary) one JSON line goes to the curve file: ES, PS,
NS and served ES on a fixed, evenly spread sample of the edits so far (early edits count only
if they survived), the canary and perplexity ratios, the known facts kept, and the cumulative
editing speed. `--consolidate-every` re-solves every live fact jointly from the base weights
(`VersionedModel.consolidate`) after each that many edits, before the point is measured.
After the last batch the full result (`run_bench`'s fields, over every edit) is
printed, and the curve is drawn next to the file as a PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from editd.bench.edit import (
    EditRun,
    Workload,
    _ratio,
    apply_sequentially,
    canary,
    json_ready,
    known_kept,
    perplexity,
    score,
    served,
)
from editd.config import Settings
from editd.editing.editor import Editor
from editd.editing.model import ModelHandle
from editd.editing.scoring import summarize
from editd.facts import FactUpdate
from editd.models.factory import make_editor
from editd.versions import VersionedModel

log = logging.getLogger(__name__)

CURVE_SAMPLE = 100  # edits scored at each curve point (all of them at the end)
CURVE_TEXTS = 100  # perplexity texts at each curve point


def spread(items: Sequence[FactUpdate], n: int) -> list[FactUpdate]:
    """`n` items evenly spread over `items` (all of them if fewer): early and late edits alike."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def measure(handle: ModelHandle, work: Workload, edited: Sequence[FactUpdate]) -> dict[str, Any]:
    sample = spread(edited, CURVE_SAMPLE)
    s = summarize(score(handle, sample)) if sample else None
    srv = served(handle, sample) if sample else {}
    mine = handle.gate_counter.mine()
    before = (mine.tokens, mine.fired)
    canary_score = canary(handle, work.canary_prompts, work.canary_objects)
    on_canary = (mine.tokens - before[0], mine.fired - before[1])
    before = (mine.tokens, mine.fired)
    ppl = perplexity(handle, work.texts[:CURVE_TEXTS])
    on_text = (mine.tokens - before[0], mine.fired - before[1])
    memory = handle.memory
    return {
        "es": s.es if s else None,
        "ps": s.ps if s else None,
        "ns": s.ns if s else None,
        "served_es": srv.get("es"),
        "served_ps": srv.get("ps"),
        "canary": canary_score,
        "perplexity": ppl,
        "known_kept": known_kept(handle, work.known),
        "sample": len(sample),
        # Share of tokens at which some gated block opened (None: nothing is gated).
        "gate_fires_canary": on_canary[1] / on_canary[0] if memory and on_canary[0] else None,
        "gate_fires_text": on_text[1] / on_text[0] if memory and on_text[0] else None,
        "memory_bytes": memory.bytes() if memory else None,
    }


def run_lifelong(
    handle: ModelHandle,
    settings: Settings,
    *,
    algo: str,
    batch_size: int,
    work: Workload,
    store_dir: Path,
    curve_path: Path | None,
    curve_every: int,
    consolidate_every: int | None = None,
) -> dict[str, Any]:
    requests = list(work.requests)
    unedited = _unedited(handle, work, store_dir)
    base, base_scores = unedited["point"], SimpleNamespace(**unedited["scores"])
    base_served, base_ppl = unedited["served"], unedited["perplexity"]
    editor = make_editor(handle, settings, algo=algo)
    model = VersionedModel.open(handle, store_dir, editor=editor)
    try:
        # Batches the editor refused, as the daemon rejects them (fact id → reason): kept
        # beside the store, so a later sitting neither retries nor scores them as edited.
        rejected_path = store_dir.with_name(store_dir.name + ".rejected.json")
        rejected: dict[str, str] = (
            json.loads(rejected_path.read_text()) if rejected_path.is_file() else {}
        )
        applied = model.applied_fact_ids()
        done = [f for f in requests if f.fact_id in applied or f.fact_id in rejected]
        todo = [f for f in requests if f.fact_id not in applied and f.fact_id not in rejected]
        if done:
            log.info("resuming: %d of %d edits are in %s", len(done), len(requests), store_dir)
        points = _read_curve(curve_path)
        runs: list[EditRun] = []
        edit_seconds = sum(p.get("edit_seconds_this_point", 0.0) for p in points)
        # Facts whose editing time no point recorded (a process stopped between a commit and
        # its point, a curve file removed, a store copied from another run): they count in the
        # curve, not in facts/s. Earlier sittings' are carried in the curve's last point.
        untimed = _untimed(points) + max(0, len(done) - (points[-1]["edits"] if points else 0))
        while todo:
            # Up to the next curve point, in whole batches.
            next_point = (len(done) // curve_every + 1) * curve_every
            chunk = todo[: max(batch_size, next_point - len(done))]
            run = apply_sequentially(model, chunk, batch_size, reject=True)
            runs.append(run)
            if run.rejected:
                rejected.update(run.rejected)
                rejected_path.write_text(json.dumps(rejected, indent=1))
            edit_seconds += run.seconds
            done += chunk
            todo = todo[len(chunk) :]
            consolidated = None
            if consolidate_every and len(done) % consolidate_every == 0:
                t = time.perf_counter()
                model.consolidate()
                consolidated = time.perf_counter() - t
                edit_seconds += consolidated  # part of what editing costs
                log.info("consolidated %d edits in %.1fs", len(done), consolidated)
            point = {
                "edits": len(done),
                "algo": algo,
                "batch_size": batch_size,
                "version": model.current,
                "rejected": len(rejected),
                **measure(handle, work, [f for f in done if f.fact_id not in rejected]),
                "edit_seconds": round(edit_seconds, 1),
                "edit_seconds_this_point": round(run.seconds, 1),
                "facts_per_second": (len(done) - untimed) / edit_seconds if edit_seconds else None,
                "untimed_edits": untimed,
                **_capacity(model, editor),
                "consolidate_seconds": consolidated,
            }
            point["canary_ratio"] = _ratio(point["canary"], base["canary"])
            point["perplexity_ratio"] = _ratio(point["perplexity"], base["perplexity"])
            point["ns_ratio"] = (
                _ratio(point["ns"], base_scores.ns) if point["ns"] is not None else None
            )
            points.append(point)
            line = json.dumps(json_ready(point))
            log.info("curve: %s", line)
            if curve_path is not None:
                with curve_path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
        t = time.perf_counter()
        scores = summarize(score(handle, requests))
        after_served = served(handle, requests)
        after_ppl = perplexity(handle, work.texts)
        after_canary = canary(handle, work.canary_prompts, work.canary_objects)
        after_known = known_kept(handle, work.known)
        scoring_seconds = time.perf_counter() - t
        result = {
            "algo": algo,
            "batch_size": batch_size,
            "edits": len(requests),
            "rejected": len(rejected),
            "dataset": work.source,
            "store": str(store_dir),
            "es": scores.es,
            "ps": scores.ps,
            "ns": scores.ns,
            "s": scores.s,
            "es_base": base_scores.es,
            "ps_base": base_scores.ps,
            "ns_base": base_scores.ns,
            "ns_ratio": _ratio(scores.ns, base_scores.ns),
            "served_es": after_served["es"],
            "served_ps": after_served["ps"],
            "served_ns": after_served["ns"],
            "served_es_base": base_served["es"],
            "canary": after_canary,
            "canary_base": base["canary"],
            "canary_ratio": _ratio(after_canary, base["canary"]),
            "canary_prompts": len(work.canary_prompts),
            "known_facts": len(work.known),
            "known_kept": after_known,
            "known_kept_base": base["known_kept"],
            "perplexity": after_ppl,
            "perplexity_base": base_ppl,
            "perplexity_ratio": _ratio(after_ppl, base_ppl),
            "edit_seconds": edit_seconds,
            "facts_per_second": (len(requests) - untimed) / edit_seconds if edit_seconds else None,
            "untimed_edits": untimed,
            "scoring_seconds": scoring_seconds,
            "model": handle.identity,
            "layers": list(editor.modules),
            "editor": json_ready(dataclasses.asdict(editor.config)),
            **_capacity(model, editor),
            "curve_points": len(points),
        }
    finally:
        model.close()
    if curve_path is not None and points:
        plot_curve(points, curve_path.with_suffix(".png"), title=f"{algo} @ {batch_size}")
    return result


def _unedited(handle: ModelHandle, work: Workload, store_dir: Path) -> dict[str, Any]:
    """The unedited model's figures, measured once per run and kept beside its store.

    Over 2,000 CounterFact edits they take 16-25 minutes on 2 cores (greedy generation on
    every prompt); a run resumed in a later sitting reads them instead. The key covers what
    they were measured on, so another workload measures again.
    """
    ids = [f.fact_id for f in work.requests] + [f.fact_id for f in work.known]
    blob = json.dumps([ids, list(work.canary_prompts), list(work.texts), handle.identity])
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = store_dir.with_name(store_dir.name + ".unedited.json")
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            log.info("unedited model's figures read from %s", path)
            return cached
    t = time.perf_counter()
    requests = list(work.requests)
    scores = summarize(score(handle, requests))
    out = {
        "key": key,
        "point": measure(handle, work, []),
        "scores": {"es": scores.es, "ps": scores.ps, "ns": scores.ns},
        "served": served(handle, requests),
        "perplexity": perplexity(handle, work.texts),
    }
    log.info("unedited model measured in %.0fs", time.perf_counter() - t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(out)))
    return out


def _capacity(model: VersionedModel, editor: Editor) -> dict[str, Any]:
    """The capacity monitor's figures: the worst layer's, and every layer's."""
    layers = model.capacity(editor.second_moments())
    return {
        "norm_ratio": max((v["norm_ratio"] for v in layers.values()), default=0.0),
        "output_drift": max((v["output_drift"] for v in layers.values()), default=0.0),
        "capacity": layers,
    }


def _untimed(points: Sequence[dict[str, Any]]) -> int:
    """Edits the curve so far counts but no point timed, as its last point says.

    A point written before points recorded `untimed_edits` says it through its facts/s:
    edits − facts/s × edit_seconds.
    """
    if not points:
        return 0
    last = points[-1]
    if "untimed_edits" in last:
        return int(last["untimed_edits"])
    rate, seconds = last.get("facts_per_second"), last.get("edit_seconds")
    if not rate or not seconds:
        return 0
    return max(0, round(last["edits"] - rate * seconds))


def _read_curve(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(points: Sequence[dict[str, Any]], out: Path, *, title: str) -> Path:
    """ES / PS / NS ratio / served ES / canary and perplexity ratios against edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [p["edits"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("es", "ES"),
        ("ps", "PS"),
        ("ns_ratio", "NS / unedited"),
        ("served_es", "served ES"),
        ("canary_ratio", "canary / unedited"),
        ("known_kept", "known facts kept"),
    ):
        ax.plot(edits, [p.get(key) for p in points], marker=".", label=label)
    ax.set_xlabel("sequential edits")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    bx.plot(edits, [p.get("perplexity_ratio") for p in points], marker=".", color="C3")
    bx.set_xlabel("sequential edits")
    bx.set_title("perplexity / unedited")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
