"""Consolidation on a lifelong run's store, measured: one curve point before, then
`VersionedModel.consolidate` (every live fact re-solved jointly from the base weights) and one
point after, once per ε of the re-solve, rolling back exactly between them. Run it on a copy of
the store, with the same settings and edit count as the run:

EDITD_EDITING__EMMET_EPS=0.1 python scripts/consolidate_store.py STORE_COPY 2000 \
    ../shared/data/counterfact/counterfact-edit.json ../shared/data/wikitext-2/valid.txt \
    [--at VERSION] [--eps 0,0.01,0.1]

`--at` first rolls the copy back to that version (a run's state before one of its own
consolidations); `--eps` gives the re-solve's ε values (default: the settings').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from editd.bench.edit import dataset_workload, json_ready
from editd.bench.lifelong import _capacity, measure
from editd.config import Settings
from editd.models.factory import load_model, make_editor
from editd.versions import VersionedModel


def main(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    handle = load_model(settings, "smollm2-135m")
    work = dataset_workload(handle, Path(args.dataset), args.edits, 0, Path(args.text))
    editor = make_editor(handle, settings, algo=args.algo)
    base = measure(handle, work, [])  # the handle serves the base until the store is opened
    model = VersionedModel.open(handle, args.store, editor=editor)
    epsilons = [float(e) for e in args.eps.split(",")] if args.eps else [None]
    afters = []
    try:
        if args.at is not None and args.at != model.current:
            model.rollback(args.at, "consolidate_store.py --at")
        start = model.current
        applied = model.applied_fact_ids()
        done = [f for f in work.requests if f.fact_id in applied]
        before = {**measure(handle, work, done), **_capacity(model, editor)}
        for eps in epsilons:
            if eps is not None:
                editor.config = dataclasses.replace(editor.config, consolidate_eps=eps)
            t = time.perf_counter()
            model.consolidate()
            seconds = time.perf_counter() - t
            after = {**measure(handle, work, done), **_capacity(model, editor)}
            afters.append({"consolidate_eps": eps, "consolidate_seconds": seconds, **after})
            model.rollback(start, "consolidate_store.py: next ε")
    finally:
        model.close()
    for point in (before, *afters):
        point["canary_ratio"] = point["canary"] / base["canary"]
        point["perplexity_ratio"] = point["perplexity"] / base["perplexity"]
        point.pop("capacity", None)
    return {"edits": len(done), "version": start, "before": before, "after": afters}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("edits", type=int)
    parser.add_argument("dataset")
    parser.add_argument("text")
    parser.add_argument("--algo", default="emmet")
    parser.add_argument("--at", type=int)
    parser.add_argument("--eps")
    print(json.dumps(json_ready(main(parser.parse_args()))))
