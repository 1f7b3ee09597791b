"""A gated store's latest version served with every block's write scaled (L_b → α L_b):
teacher-forced ES/PS/NS, served ES/PS/NS and the canary ratio per α, one JSON line each.
It reads the store only; what it serves is built in this process.

    python scripts/gate_write_scale.py smollm2-135m --store DIR --dataset counterfact-edit.json \
        --records 100 --scales 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from editd.bench.data import draw, load_dataset, split
from editd.bench.edit import canary, score, served
from editd.config import Settings
from editd.editing.scoring import canary_pairs, summarize
from editd.memory import GatedMemory
from editd.models.factory import load_model
from editd.monitoring.canary import canary_prompts
from editd.store.store import EditStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--store", required=True, help="a gated store (editd bench edit --store)")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--records", type=int, default=100, help="the records the store edited")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scales", default="1,2")
    args = ap.parse_args()
    handle = load_model(Settings(), args.model)
    facts = draw(split(load_dataset(Path(args.dataset)), "eval"), args.records, args.seed)
    with handle.reading():
        prompts, objects = canary_pairs(handle.model, handle.tokenizer, canary_prompts())
    base_canary = canary(handle, prompts, objects)
    store = EditStore(args.store, readonly=True)
    store.open()
    with store:
        deltas, memory = store.served_state()
    for alpha in (float(a) for a in args.scales.split(",")):
        blocks = tuple(
            dataclasses.replace(
                b, layers={n: (left * alpha, right) for n, (left, right) in b.layers.items()}
            )
            for b in memory.blocks
        )
        handle.serve(deltas, GatedMemory(blocks))
        s = summarize(score(handle, facts))
        srv = served(handle, facts)
        line = {
            "scale": alpha,
            "facts": memory.facts,
            "es": s.es,
            "ps": s.ps,
            "ns": s.ns,
            "served_es": srv["es"],
            "served_ps": srv["ps"],
            "served_ns": srv["ns"],
            "canary_ratio": canary(handle, prompts, objects) / base_canary,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
