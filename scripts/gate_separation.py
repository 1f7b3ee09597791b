"""How well a gated memory's gate separates a fact's own prompts from everything else, per
projection rank and threshold (editd.editing.gate). One JSON line per (rank, threshold).

    python scripts/gate_separation.py MODEL_DIR --dataset counterfact-edit.json \
        --text wikitext-2/valid.txt --layer 4 --records 240 --ranks 64,256,1536
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from editd.bench.data import draw, load_dataset, split
from editd.editing.gate import choose_threshold, measure_separation
from editd.editing.model import ModelHandle
from editd.editing.stats import SecondMomentCache
from editd.memory import gate_projection
from editd.models.corpus import stats_corpus

THRESHOLDS = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--records", type=int, default=240)
    ap.add_argument("--texts", type=int, default=30, help="WikiText chunks of 200 words")
    ap.add_argument("--ranks", default="64,256,1536")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, help="C0 text (default: the model's own)")
    args = ap.parse_args()

    handle = ModelHandle.load(args.model)
    module = handle.module_name(args.layer)
    cache = Path.home() / ".cache" / "editd"
    corpus = stats_corpus(handle, configured=args.corpus, cache_dir=cache)
    c0 = SecondMomentCache(cache).get(handle, [module], corpus)[module]
    facts = draw(split(load_dataset(args.dataset), "heldout"), args.records, args.seed)
    words = Path(args.text).read_text().split()
    texts = [" ".join(words[i : i + 200]) for i in range(0, 200 * args.texts, 200)]
    for rank in (int(r) for r in args.ranks.split(",")):
        rows = measure_separation(
            handle, facts, texts, module, gate_projection(c0, rank), THRESHOLDS
        )
        best = choose_threshold(rows)
        for row in rows:
            line = {"layer": args.layer, "rank": rank, **dataclasses.asdict(row)}
            line["chosen"] = row is best
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
