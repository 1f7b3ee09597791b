"""`editd bench gate`: what serving through a gated memory costs per completion, by stored facts.

The model serves a gated memory of N stored facts in blocks of `--block` (random factors of a
batch's rank at every edited layer, random unit gate keys in a projection of the profile's
rank), installed through `ModelHandle.serve` as the daemon installs one; then the same
prompts are completed greedily (`--tokens` tokens each, one request at a time, KV cache)
against the unedited model in the same run. Random keys almost never open a gate, which is
what most tokens of real traffic do too: this is the cost of deciding, the part that grows
with N. One JSON line per N: p50 / p99 seconds of a completion, its ratio to the unedited
model's, the gate's firing rate, and the memory's bytes per fact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from editd.config import Settings

PROMPTS = (
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "Apple A5 was created by",
    "The Eiffel Tower is located in",
    "Toko Yasuda plays the",
    "The official language of Sweden is",
    "Barack Obama was born in",
    "The author of Hamlet is",
)


def random_memory(
    d_outs: dict[str, int], d_in: int, facts: int, block: int, rank: int, seed: int
) -> Any:
    from editd.memory import Block, Gate, GatedMemory

    g = torch.Generator().manual_seed(seed)
    gate_module = sorted(d_outs)[0]
    projection = torch.linalg.qr(torch.randn(d_in, rank, generator=g))[0].contiguous()
    blocks = []
    for i, start in enumerate(range(0, facts, block)):
        b = min(block, facts - start)
        keys = torch.randn(b, rank, generator=g)
        keys = keys / keys.norm(dim=1, keepdim=True)
        layers = {
            name: (
                torch.randn(d_out, b, generator=g) * 1e-3,
                torch.randn(b, d_in, generator=g) * 1e-3,
            )
            for name, d_out in d_outs.items()
        }
        blocks.append(Block(i + 1, layers, Gate(gate_module, 0.6, projection, keys)))
    return GatedMemory(tuple(blocks))


def time_completions(handle: Any, ids: list[list[int]], tokens: int, rounds: int) -> list[float]:
    from editd.editing.decoding import greedy_continuations

    pad = handle.tokenizer.eos_token_id or 0
    out = []
    with handle.reading():
        greedy_continuations(handle.model, ids[:1], [tokens], pad_id=pad)  # warm-up
        for _ in range(rounds):
            for row in ids:
                t = time.perf_counter()
                greedy_continuations(handle.model, [row], [tokens], pad_id=pad, batch_size=1)
                out.append(time.perf_counter() - t)
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(args: argparse.Namespace, settings: Settings) -> int:
    from editd.editing.subject import leading_special_ids
    from editd.models.factory import editor_config, load_model

    handle = load_model(settings, args.model)
    config = editor_config(handle, settings)
    layers = list(config.layers or handle.default_layers())
    names = [handle.module_name(i) for i in layers]
    d_outs = {n: handle.weight(n).shape[0] for n in names}
    d_in = handle.weight(names[0]).shape[1]
    tok = handle.tokenizer
    lead = leading_special_ids(tok)
    ids = [lead + tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    counts = [int(x) for x in args.facts.split(",")]
    base: list[float] | None = None
    for n in counts:
        memory = (
            random_memory(d_outs, d_in, n, args.block, config.gate_rank or d_in, args.seed)
            if n
            else None
        )
        handle.serve({}, memory)
        before = handle.gate_counter.snapshot()
        times = time_completions(handle, ids, args.tokens, args.rounds)
        after = handle.gate_counter.snapshot()
        if base is None and n == 0:
            base = times
        p50, p99 = statistics.median(times), _quantile(times, 0.99)
        tokens_seen = after.tokens - before.tokens
        row = {
            "bench": "gate",
            "model": handle.identity,
            "layers": layers,
            "facts": n,
            "block": args.block,
            "gate_rank": config.gate_rank or d_in,
            "completion_tokens": args.tokens,
            "completions": len(times),
            "p50_seconds": p50,
            "p99_seconds": p99,
            "p50_ratio": p50 / statistics.median(base) if base else None,
            "p99_ratio": p99 / _quantile(base, 0.99) if base else None,
            "gate_fires": (after.fired - before.fired) / tokens_seen if tokens_seen else None,
            "memory_bytes": memory.bytes() if memory else 0,
            "bytes_per_fact": memory.bytes() / n if memory else None,
            "threads": torch.get_num_threads(),
            "device": str(handle.device),
        }
        print(json.dumps(row), flush=True)
    handle.reset()
    return 0
