"""`editd bench study`: "Is bigger edit batch size always better?" on the built-in model.

Two experiments per method (MEMIT, EMMET), after Yoon, Gupta & Anumanchipalli (2024):

- batch: each batch size B edits the base model once with B facts. Small B is repeated on
  disjoint facts from a fresh base model until at least `min_facts` facts were edited, so every
  point averages over a comparable number of facts; scores are pooled over those facts.
- sequential: `sequential_total` facts edited in consecutive batches of B on one model (earlier
  batches preserved), scored after the last batch over all of them.

Results go to `<out>/study.json` (and one JSON line per point on stdout) and `<out>/study.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from editd.bench.edit import (
    apply_sequentially,
    canary,
    canary_set,
    json_ready,
    peak_rss_mb,
    score,
)
from editd.config import SCORE_NAMES, Settings
from editd.editing.model import ModelHandle
from editd.editing.scoring import FactLogprobs, summarize
from editd.exitcodes import EXIT_OK, EXIT_USAGE
from editd.models.factory import load_model, make_editor
from editd.models.registry import BUILTIN
from editd.versions import VersionedModel

log = logging.getLogger(__name__)

METRICS = SCORE_NAMES


@dataclass(frozen=True)
class StudyPlan:
    algos: tuple[str, ...] = ("memit", "emmet")
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256, 1024)
    min_facts: int = 32
    # The paper edits 4,096 facts sequentially on a GPU; 1,024 in batches of 16 to 1,024 (the
    # largest one-batch size, so both experiments meet there) runs in ~10 minutes on 2 cores.
    sequential_total: int = 1024
    sequential_batch_sizes: tuple[int, ...] = (16, 64, 256, 1024)
    canary_size: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (*self.batch_sizes, *self.sequential_batch_sizes)
        if not self.algos or any(b <= 0 for b in sizes) or self.min_facts <= 0:
            raise ValueError(f"invalid study plan: {self}")
        if self.sequential_batch_sizes and self.sequential_total <= 0:
            raise ValueError("sequential_total must be positive")

    @property
    def pool_size(self) -> int:
        batch = max((self._facts_for(b) for b in self.batch_sizes), default=0)
        seq = self.sequential_total if self.sequential_batch_sizes else 0
        return max(batch, seq)

    def _facts_for(self, batch_size: int) -> int:
        return batch_size * self.repeats(batch_size)

    def repeats(self, batch_size: int) -> int:
        return max(1, math.ceil(self.min_facts / batch_size))


def _point(
    kind: str,
    algo: str,
    batch_size: int,
    logprobs: list[FactLogprobs],
    seconds: float,
    canary_after: float,
    canary_base: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    scores = summarize(logprobs)
    facts = len(logprobs)
    return {
        "experiment": kind,
        "algo": algo,
        "batch_size": batch_size,
        "edits": facts,
        **{m: getattr(scores, m) for m in METRICS},
        "es_magnitude": scores.es_magnitude,
        "ps_magnitude": scores.ps_magnitude,
        "ns_magnitude": scores.ns_magnitude,
        "heldout_accuracy": canary_after,
        "heldout_accuracy_base": canary_base,
        "seconds": seconds,
        "facts_per_second": facts / seconds if seconds > 0 else math.nan,
        **extra,
    }


def run_study(
    handle: ModelHandle, settings: Settings, plan: StudyPlan, emit=None
) -> dict[str, Any]:
    """Run both experiments for every method; `emit(point)` is called as each point lands."""
    from editd.world.requests import make_requests

    pool = make_requests(plan.pool_size, plan.seed)
    prompts, objects = canary_set(pool, plan.canary_size, plan.seed)
    handle.reset()
    canary_base = canary(handle, prompts, objects)
    points: list[dict[str, Any]] = []
    stats_seconds = 0.0
    started = time.perf_counter()

    def land(point: dict[str, Any]) -> None:
        points.append(point)
        if emit is not None:
            emit(point)

    for algo in plan.algos:
        editor = make_editor(handle, settings, algo=algo)
        stats_seconds += editor.prepare()
        one_batch: dict[int, dict[str, Any]] = {}  # batch size → its point
        for b in plan.batch_sizes:
            logprobs: list[FactLogprobs] = []
            seconds = 0.0
            for r in range(plan.repeats(b)):
                facts = pool[r * b : (r + 1) * b]
                with VersionedModel.temporary(handle, editor) as model:
                    run = apply_sequentially(model, facts, b)
                    seconds += run.seconds
                    logprobs += score(handle, facts)
                    # The canary of the last repeat: one batch of b facts, as the point says.
                    after = canary(handle, prompts, objects)
            extra = {"repeats": plan.repeats(b)}
            one_batch[b] = _point("batch", algo, b, logprobs, seconds, after, canary_base, extra)
            land(one_batch[b])
        for b in plan.sequential_batch_sizes:
            total = plan.sequential_total
            if b >= total and total in one_batch and plan.repeats(total) == 1:
                # One batch of all the facts: the batch experiment already edited exactly these.
                point = {**one_batch[total], "experiment": "sequential", "batches": 1}
                point.pop("repeats")
                land(point)
                continue
            facts = pool[:total]
            with VersionedModel.temporary(handle, editor) as model:
                run = apply_sequentially(model, facts, b)
                point = _point(
                    "sequential",
                    algo,
                    b,
                    score(handle, facts),
                    run.seconds,
                    canary(handle, prompts, objects),
                    canary_base,
                    {"batches": run.batches},
                )
            land(point)

    return {
        "plan": asdict(plan),
        "model": handle.identity,
        "device": str(handle.device),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "stats_seconds": stats_seconds,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "heldout_accuracy_base": canary_base,
        "points": points,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """ES/PS/NS/S against batch size: one panel per experiment and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(result["plan"]["algos"])
    kinds = [
        k for k in ("batch", "sequential") if any(p["experiment"] == k for p in result["points"])
    ]
    fig, axes = plt.subplots(
        len(kinds), len(algos), figsize=(4.2 * len(algos), 3.4 * len(kinds)), squeeze=False
    )
    titles = {
        "batch": "one batch of B edits",
        "sequential": f"{result['plan']['sequential_total']} edits, sequential batches of B",
    }
    for row, kind in enumerate(kinds):
        for col, algo in enumerate(algos):
            ax = axes[row][col]
            pts = sorted(
                (p for p in result["points"] if p["experiment"] == kind and p["algo"] == algo),
                key=lambda p: p["batch_size"],
            )
            xs = [p["batch_size"] for p in pts]
            for metric, marker in zip(METRICS, "os^D", strict=True):
                ax.plot(xs, [p[metric] for p in pts], marker=marker, label=metric.upper())
            if result["heldout_accuracy_base"]:
                ax.plot(
                    xs,
                    [p["heldout_accuracy"] / result["heldout_accuracy_base"] for p in pts],
                    linestyle=":",
                    color="grey",
                    label="canary / base",
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"{algo.upper()}: {titles[kind]}", fontsize=9)
            ax.set_xlabel("batch size B")
            if col == 0:
                ax.set_ylabel("score")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def table(result: dict[str, Any]) -> str:
    """The points as a Markdown table, for the write-up beside the plot."""
    lines = [
        "| experiment | algo | B | edits | ES | PS | NS | S | canary | facts/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        cells = [p["experiment"], p["algo"], str(p["batch_size"]), str(p["edits"])]
        cells += [f"{p[m]:.3f}" for m in (*METRICS, "heldout_accuracy")]
        cells.append(f"{p['facts_per_second']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    base = result["heldout_accuracy_base"]
    lines.append("")
    lines.append(f"Canary (unedited facts, held-out template) of the base model: {base:.3f}.")
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """study.json, study.png and table.md under `out`, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "study.json", out / "study.png"
    tmp = out / "table.md.tmp"
    tmp.write_text(table(result), "utf-8")
    tmp.replace(out / "table.md")
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_ready(result), indent=1, allow_nan=False) + "\n", "utf-8")
    tmp.replace(json_path)
    plot(result, png_path)
    return json_path, png_path


def _sizes(text: str | None, default: Sequence[int]) -> tuple[int, ...]:
    if text is None:
        return tuple(default)
    return tuple(int(x) for x in text.split(",") if x.strip())


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    default = StudyPlan()
    get = lambda name: getattr(args, name, None)  # noqa: E731
    return StudyPlan(
        algos=tuple(get("algos").split(",")) if get("algos") else default.algos,
        batch_sizes=_sizes(get("batch_sizes"), default.batch_sizes),
        min_facts=get("min_facts") or default.min_facts,
        sequential_total=get("sequential_total") or default.sequential_total,
        sequential_batch_sizes=_sizes(
            get("sequential_batch_sizes"), default.sequential_batch_sizes
        ),
        canary_size=get("canary_size") or default.canary_size,
        seed=args.seed,
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        print(f"editd bench study: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handle = load_model(settings, getattr(args, "model", None) or BUILTIN)

    def emit(point: dict[str, Any]) -> None:
        print(json.dumps(json_ready(point), allow_nan=False), flush=True)

    result = run_study(handle, settings, plan, emit=emit)
    json_path, png_path = write_results(result, args.out)
    log.info("wrote %s and %s in %.0fs", json_path, png_path, result["seconds"])
    return EXIT_OK
