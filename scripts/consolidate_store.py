"""Consolidation on a lifelong run's store, measured: one curve point before, then
`VersionedModel.consolidate` (every live fact re-solved jointly from the base weights), then
one after. Run it on a copy of the store, with the same settings and `--edits` as the run:

EDITD_EDITING__EMMET_EPS=0.1 python scripts/consolidate_store.py STORE_COPY 2000 \
    ../shared/data/counterfact/counterfact-edit.json ../shared/data/wikitext-2/valid.txt
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from editd.bench.edit import dataset_workload, json_ready, load_handle, make_editor
from editd.bench.lifelong import _capacity, measure
from editd.config import Settings
from editd.versions import VersionedModel


def main(store: str, edits: str, dataset: str, text: str, algo: str = "emmet") -> dict:
    settings = Settings()
    handle = load_handle(Path("smollm2-135m"), settings)
    work = dataset_workload(handle, Path(dataset), int(edits), 0, Path(text))
    editor = make_editor(handle, settings, algo)
    base = measure(handle, work, [])  # the handle serves the base until the store is opened
    model = VersionedModel.open(handle, store, editor=editor)
    try:
        applied = model.applied_fact_ids()
        done = [f for f in work.requests if f.fact_id in applied]
        before = {**measure(handle, work, done), **_capacity(model, editor)}
        t = time.perf_counter()
        model.consolidate()
        seconds = time.perf_counter() - t
        after = {**measure(handle, work, done), **_capacity(model, editor)}
    finally:
        model.close()
    for point in (before, after):
        point["canary_ratio"] = point["canary"] / base["canary"]
        point["perplexity_ratio"] = point["perplexity"] / base["perplexity"]
        point.pop("capacity", None)
    return {"edits": len(done), "consolidate_seconds": seconds, "before": before, "after": after}


if __name__ == "__main__":
    print(json.dumps(json_ready(main(*sys.argv[1:]))))
