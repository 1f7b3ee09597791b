"""`editd model build`: train the tokenizer and the built-in Llama, save them in HF format."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from editd.config import Settings
from editd.world.builtin import ASSETS
from editd.world.tokenizer import train_tokenizer
from editd.world.train import TrainConfig, train
from editd.world.world import WORLD_SEED, load_world

log = logging.getLogger(__name__)


def build(out: Path, cfg: TrainConfig) -> dict[str, object]:
    """Train from scratch and write `out` (config.json, model.safetensors, tokenizer files)."""
    start = time.perf_counter()
    world = load_world(WORLD_SEED)
    tokenizer = train_tokenizer(world.corpus())
    bar = tqdm(total=1, desc="training", unit="step", dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    model = train(tokenizer, world.training_examples(), cfg, progress=progress)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "world_seed": WORLD_SEED,
        "train": asdict(cfg),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(args: argparse.Namespace, settings: Settings) -> int:
    cfg = TrainConfig(seed=args.seed)
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    out = args.out or ASSETS
    info = build(out, cfg)
    log.info("built %s in %.0f s", out, info["build_seconds"])
    print(json.dumps(info))
    return 0
