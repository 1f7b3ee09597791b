"""A lifelong store's gated memory served with per-fact thresholds, against its uniform one.

Each stored fact's threshold becomes what `editing.gate_margin` makes it at edit time
(editd.editing.gate.calibrated_thresholds): its key's highest similarity on calibration text
+ the margin, within [τ, 0.9]. The calibration text is the model's own C0 corpus, as the editor
uses (`--calib corpus`), or WikiText prose after the benchmark's 200 perplexity lines
(`--calib wikitext`), so nothing measured is calibrated on. The factors are the store's own:
only where blocks open changes. Then the memory is measured as a curve point is
(editd.bench.lifelong.measure: the same 100-edit sample, canary, perplexity, known facts), once
per margin and once with the uniform τ, which reproduces the curve's own last point. One JSON
line per variant.

    python scripts/gate_thresholds.py STORE --model smollm2-135m \\
        --dataset counterfact-edit.json --text wikitext-2/valid.txt --edits 7700
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from editd.bench.edit import PERPLEXITY_TEXTS, dataset_workload, prose_lines
from editd.bench.lifelong import measure
from editd.config import Settings
from editd.editing.gate import calibrated_thresholds, text_embeddings
from editd.memory import GatedMemory
from editd.models.corpus import stats_corpus
from editd.models.factory import load_model
from editd.store.store import EditStore


def calibrated(memory: GatedMemory, reference: torch.Tensor, margin: float) -> GatedMemory:
    """`memory` with each fact's threshold as the editor would have set it with `margin`."""
    blocks = []
    for block in memory.blocks:
        gate = block.gate
        limits = calibrated_thresholds(gate.keys, reference, gate.threshold, margin)
        blocks.append(dataclasses.replace(block, gate=dataclasses.replace(gate, thresholds=limits)))
    return GatedMemory(tuple(blocks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--edits", type=int, required=True, help="the run's --edits (its draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", choices=("corpus", "wikitext"), default="corpus")
    ap.add_argument("--calib-tokens", type=int, default=15360, help="the editor's: C0's budget")
    ap.add_argument("--margins", default="0,0.05")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings()
    handle = load_model(settings, args.model)
    with EditStore(args.store, readonly=True) as store:
        store.open()
        memory = store.memory()
        applied = {i for v in store.lineage()[1:] for i in store.version(v).fact_ids}
    work = dataset_workload(handle, args.dataset, args.edits, args.seed, args.text)
    edited = [f for f in work.requests if f.fact_id in applied]
    unedited = json.loads(args.store.with_name(args.store.name + ".unedited.json").read_text())
    base = unedited["point"]

    t = time.perf_counter()
    if args.calib == "corpus":
        cache = Path(settings.model.cache_dir) if settings.model.cache_dir else None
        texts = stats_corpus(handle, configured=None, cache_dir=cache or Path.home() / ".cache")
    else:
        prose = prose_lines(args.text)
        texts = prose[PERPLEXITY_TEXTS:]
    gate = memory.blocks[0].gate
    reference = text_embeddings(handle, gate.module, gate.projection, texts, args.calib_tokens)
    calib_seconds = time.perf_counter() - t

    variants: list[tuple[str, GatedMemory]] = [("uniform", memory)]
    for margin in (float(m) for m in args.margins.split(",")):
        variants.append((f"per-fact+{margin:g}", calibrated(memory, reference, margin)))
    for name, variant in variants:
        handle.serve({}, variant)
        t = time.perf_counter()
        point = measure(handle, work, edited)
        raised = sum(
            int((b.gate.fact_thresholds() > b.gate.threshold).sum()) for b in variant.blocks
        )
        line = {
            "variant": name,
            "facts": variant.facts,
            "facts_raised": raised,
            "calibration": args.calib,
            "calibration_tokens": int(reference.shape[0]),
            "calibration_seconds": round(calib_seconds, 1),
            **point,
            "canary_ratio": point["canary"] / base["canary"],
            "ns_ratio": point["ns"] / unedited["scores"]["ns"],
            "perplexity_ratio": point["perplexity"] / base["perplexity"],
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
