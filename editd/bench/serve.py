"""`editd bench serve`: what one completions request of many prompts costs, by batch rows.

The request is what the HTTP server's `/v1/completions` runs (`Generator.complete`): `--prompts`
prompts (the gate bench's, cycled), `--tokens` tokens each, greedy. It is timed with the
server's `serve.max_batch_rows` set to each value of `--rows` (1 decodes the prompts one after
another, as the server did before choices were batched), on the model as the daemon loads it,
in one process, alternating the settings round by round so that a change in the machine's
speed falls on all of them alike. One JSON line per setting: p50 / min seconds per request,
completion tokens per second, and whether its answers equal those of the first setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from editd.bench.gate import PROMPTS
from editd.config import Settings


def main(args: argparse.Namespace, settings: Settings) -> int:
    from editd.daemon.generation import Generator, SamplingParams
    from editd.models.factory import load_model

    handle = load_model(settings, args.model)
    rows = [int(x) for x in args.rows.split(",")]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0)
    generators = {r: Generator(handle, lambda: 0, max_batch_rows=r) for r in rows}
    generators[rows[0]].complete(prompts[:1], params)  # warm-up
    seconds: dict[int, list[float]] = {r: [] for r in rows}
    answers: dict[int, list[str]] = {}
    tokens: dict[int, int] = {}
    for _ in range(args.rounds):
        for r in rows:
            t = time.perf_counter()
            result = generators[r].complete(prompts, params)
            seconds[r].append(time.perf_counter() - t)
            answers[r] = [c.text for c in result.choices]
            tokens[r] = result.completion_tokens
    for r in rows:
        p50 = statistics.median(seconds[r])
        print(
            json.dumps(
                {
                    "bench": "serve",
                    "model": handle.identity,
                    "prompts": len(prompts),
                    "max_tokens": args.tokens,
                    "max_batch_rows": r,
                    "requests": len(seconds[r]),
                    "p50_seconds": p50,
                    "min_seconds": min(seconds[r]),
                    "completion_tokens": tokens[r],
                    "tokens_per_second": tokens[r] / p50,
                    "speedup_vs_first": statistics.median(seconds[rows[0]]) / p50,
                    "answers_equal_first": answers[r] == answers[rows[0]],
                    "threads": torch.get_num_threads(),
                    "device": str(handle.device),
                }
            ),
            flush=True,
        )
    return 0
