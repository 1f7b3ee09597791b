"""Which text, and how much of it, makes per-fact gate thresholds catch the false opens.

Static: no edit and no generation. A lifelong store's gated keys are calibrated
(editd.editing.gate.calibrated_thresholds, as the editor does with `editing.gate_margin`) on
each candidate text, and each result is judged on held-out prose: the benchmark's 200
perplexity lines of WikiText, which no candidate contains. Reported per candidate: the facts
raised, the share of held-out tokens at which some fact's gate opens, and how many facts open
there at all. Candidates: SmolLM2's own C0 text (the editor's default, at C0's budget and
whole) and WikiText prose after those 200 lines at three budgets.

    python scripts/gate_calibration_text.py STORE --text wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editd.bench.edit import PERPLEXITY_TEXTS, prose_lines
from editd.config import Settings
from editd.editing.gate import calibrated_thresholds, text_embeddings
from editd.models.corpus import stats_corpus
from editd.models.factory import load_model
from editd.store.store import EditStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    handle = load_model(Settings(), args.model)
    with EditStore(args.store, readonly=True) as store:
        store.open()
        memory = store.memory()
    gates = [b.gate for b in memory.blocks]
    first = gates[0]
    keys = torch.cat([g.keys.float() for g in gates])
    tau = float(first.threshold)
    prose = prose_lines(args.text)
    held = text_embeddings(handle, first.module, first.projection, prose[:PERPLEXITY_TEXTS], 10**9)
    corpus = list(stats_corpus(handle, configured=None, cache_dir=Path.home() / ".cache"))
    candidates = {
        "corpus-15360": (corpus, 15360),
        "corpus-all": (corpus, 10**9),
        "wikitext-15360": (prose[PERPLEXITY_TEXTS:], 15360),
        "wikitext-44000": (prose[PERPLEXITY_TEXTS:], 44000),
        "wikitext-88000": (prose[PERPLEXITY_TEXTS:], 88000),
    }

    def opens(limits: torch.Tensor) -> tuple[float, int]:
        fired = torch.zeros(held.shape[0], dtype=torch.bool)
        per_fact = torch.zeros(keys.shape[0], dtype=torch.long)
        for lo in range(0, held.shape[0], 4096):
            hit = held[lo : lo + 4096] @ keys.T > limits
            fired[lo : lo + 4096] = hit.any(1)
            per_fact += hit.sum(0)
        return float(fired.float().mean()), int((per_fact > 0).sum())

    base = {"facts": keys.shape[0], "held_out_tokens": held.shape[0]}
    rate, n = opens(torch.full((keys.shape[0],), tau))
    print(json.dumps({"source": "uniform", **base, "held_open_rate": rate, "facts_opening": n}))
    for name, (texts, budget) in candidates.items():
        t = time.time()
        reference = text_embeddings(handle, first.module, first.projection, texts, budget)
        for margin in (0.0, 0.05):
            limits = calibrated_thresholds(keys, reference, tau, margin)
            rate, n = opens(limits)
            line = {
                "source": name,
                **base,
                "tokens": reference.shape[0],
                "margin": margin,
                "raised": int((limits > tau).sum()),
                "held_open_rate": rate,
                "facts_opening": n,
                "seconds": round(time.time() - t, 1),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
