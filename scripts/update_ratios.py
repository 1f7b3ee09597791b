"""How far each batch of a stream moves the edited layers (‖Δ‖ / ‖W‖), with the guard off.

    PYTHONPATH=. python scripts/update_ratios.py --seeds 5151,1,2 --batch-size 50 [--batches 2]
        [--model DIR] [--layers 3,4,5] [--site S] [--canary 200] [--cache DIR]

One JSON line per batch: seed, batch index, each edited layer's update ratio (what
`editing.max_update_ratio` compares), the share of the batch's new objects that were top-1
after it (post_top1) and, with --canary N, the held-out accuracy after it over N facts of the
built-in world that no request touches, as a fraction of the unedited model's (canary_ratio).
The editor is built the daemon's way (settings, then the model's profile) and each batch is
applied through VersionedModel, as the daemon applies it, so later batches see earlier ones.
docs/guard records what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from editd.bench.edit import canary, canary_set
from editd.config import Settings
from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.models.corpus import stats_corpus
from editd.models.profile import with_profile
from editd.versions import VersionedModel
from editd.world.builtin import builtin_model_dir
from editd.world.requests import make_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="5151")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--facts", type=int, default=300, help="requests drawn per seed")
    p.add_argument("--batches", type=int, help="stop after this many batches per seed")
    p.add_argument("--model", type=Path, help="model directory (default: the built-in model)")
    p.add_argument("--layers", help="edited layers, comma-separated (default: the profile's)")
    p.add_argument("--site", choices=["subject_last", "prompt_last"], help="default: the profile's")
    p.add_argument("--cache", type=Path, help="C0 cache (default: a temporary directory)")
    p.add_argument("--canary", type=int, default=0, help="held-out facts scored after each batch")
    args = p.parse_args()

    path = args.model or builtin_model_dir()
    handle = ModelHandle.load(path, device="cpu", dtype="float32")
    editing = Settings().editing
    if args.layers:
        editing = editing.model_copy(update={"layers": [int(x) for x in args.layers.split(",")]})
    if args.site:
        editing = editing.model_copy(update={"site": args.site})
    # The guard off, so that an oversized batch is measured and applied like any other.
    config = dataclasses.replace(
        EditorConfig.from_settings(with_profile(editing, path, "editing")), max_update_ratio=None
    )
    with tempfile.TemporaryDirectory(prefix="editd-ratios-") as tmp:
        cache = args.cache or Path(tmp)
        corpus = stats_corpus(handle, configured=None, cache_dir=cache, tokens=None)
        editor = Editor(handle, config, corpus=corpus, cache_dir=cache, progress=False)
        editor.prepare()
        for seed in (int(s) for s in args.seeds.split(",")):
            requests = make_requests(args.facts, seed)
            stop = len(requests) if args.batches is None else args.batches * args.batch_size
            prompts, objects = canary_set(requests, args.canary) if args.canary else ([], [])
            base = canary(handle, prompts, objects) if prompts else None
            with VersionedModel.temporary(handle, editor) as versioned:
                for i in range(0, min(stop, len(requests)), args.batch_size):
                    batch = requests[i : i + args.batch_size]
                    update = editor.compute_update(batch)
                    solver = update.diagnostics["solver"]
                    ratios = {name: round(d["update_ratio"], 3) for name, d in solver.items()}
                    row = {
                        "seed": seed,
                        "batch_size": args.batch_size,
                        "batch": i // args.batch_size,
                        "post_top1": round(float(update.diagnostics["post_top1"]), 3),
                        "max_ratio": max(ratios.values()),
                        "ratios": ratios,
                    }
                    versioned.apply(update, batch)
                    if base:
                        row["canary_ratio"] = round(canary(handle, prompts, objects) / base, 3)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
