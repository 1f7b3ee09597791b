"""Where a gated memory's false opens come from, read from a store's files (editd.memory).

For every fact stored in the gated versions of STORE (their `_gate.facts` keys and the shared
projection), the gate module's input is read at every token of ordinary text (WikiText lines,
the benchmark's perplexity texts first) and of the canary prompts, and compared with every
stored key as the served gate does (cosine ≥ τ). Prints one JSON object:

- how many text and canary tokens open some block, and how those opens spread over the facts
  (a few facts with generic keys, or many facts each opening rarely);
- how many opens fall on a token that ends a mention of the opening fact's own subject (a
  right open: the text does read that subject);
- per-fact thresholds calibrated on other text: τ_f = max(τ, m_f + margin), m_f the fact's
  highest similarity on calibration lines the evaluation lines do not include, with what
  they cost in paraphrase opens (any token of a fact's paraphrase prompts reaching τ_f on
  its own key).

Reads the store's files without opening it, so a running benchmark may hold its lock.

    python scripts/gate_leak.py STORE MODEL_DIR --text wikitext-2/valid.txt
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from editd.bench.edit import PERPLEXITY_TEXTS, prose_lines
from editd.editing.gate import token_inputs
from editd.editing.model import ModelHandle
from editd.memory import GATE_KEYS, PROJECTION, embed
from editd.monitoring.canary import canary_prompts

MARGINS = (0.0, 0.02, 0.05, 0.1)


def stored_facts(store: Path) -> tuple[torch.Tensor, torch.Tensor, list[dict], str, float]:
    """Keys (F, r), the projection, the facts in key order, the gate module and τ."""
    keys, facts, projection, module, tau = [], [], None, "", 0.0
    for d in sorted((store / "versions").iterdir()):
        manifest = json.loads((d / "manifest.json").read_text())
        gate = manifest.get("gate")
        if manifest.get("state") != "committed" or not gate:
            continue
        tensors = load_file(d / "update.safetensors")
        keys.append(tensors[GATE_KEYS])
        batch = manifest["facts"]
        facts.extend(ast.literal_eval(batch) if isinstance(batch, str) else batch)
        module, tau = gate["module"], float(gate["threshold"])
        if projection is None:
            if PROJECTION in tensors:
                projection = tensors[PROJECTION]
            else:
                shared = store / "gates" / f"{gate['projection']}.safetensors"
                projection = load_file(shared)["projection"]
    if projection is None:
        raise SystemExit(f"{store} holds no committed gated version")
    return torch.cat(keys), projection, facts, module, tau


def best_match(
    handle: ModelHandle, module: str, texts: list[str], projection: torch.Tensor, keys: torch.Tensor
) -> list[torch.Tensor]:
    """Per text: every token's similarity to every stored key, (n_tokens, F)."""
    with handle.reading():
        return [embed(x, projection) @ keys.T for x in token_inputs(handle, module, texts)]


def token_ends(handle: ModelHandle, text: str) -> list[str]:
    """Each token's text prefix (the text read up to and including it), BOS left out."""
    enc = handle.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return [text[:end] for _, end in enc["offset_mapping"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", type=Path)
    ap.add_argument("model")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--eval-texts", type=int, default=100, help="the curve's perplexity texts")
    ap.add_argument("--calib-texts", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    keys, projection, facts, module, tau = stored_facts(args.store)
    handle = ModelHandle.load(args.model)
    prose = prose_lines(args.text)
    evaluation = prose[: args.eval_texts]
    # After the benchmark's 200 perplexity texts, so calibration never sees what is scored.
    calibration = prose[PERPLEXITY_TEXTS : PERPLEXITY_TEXTS + args.calib_texts]
    canary = list(canary_prompts())

    sims_eval = best_match(handle, module, evaluation, projection, keys)
    sims_canary = best_match(handle, module, canary, projection, keys)
    sims_calib = best_match(handle, module, calibration, projection, keys)
    n_facts = keys.shape[0]

    # Opens per fact on evaluation text, and whether an open ends a mention of its subject.
    per_fact = torch.zeros(n_facts, dtype=torch.long)
    fired_tokens = right_tokens = 0
    examples: list[dict] = []
    tokens = 0
    for text, s in zip(evaluation, sims_eval, strict=True):
        ends = token_ends(handle, text)
        tokens += s.shape[0]
        hits = s >= tau
        per_fact += hits.sum(0)
        for t in hits.any(1).nonzero().squeeze(1).tolist():
            fired_tokens += 1
            owners = hits[t].nonzero().squeeze(1).tolist()
            read = ends[t] if t < len(ends) else text
            right = any(read.endswith(facts[f]["subject"]) for f in owners)
            right_tokens += right
            if len(examples) < 40:
                f = max(owners, key=lambda j: float(s[t, j]))
                examples.append(
                    {
                        "context": read[-60:],
                        "subject": facts[f]["subject"],
                        "similarity": round(float(s[t, f]), 3),
                        "facts_open": len(owners),
                    }
                )
    ordered = per_fact.sort(descending=True).values
    opens = int(per_fact.sum())

    def top_share(k: int) -> float:
        return float(ordered[:k].sum()) / opens if opens else 0.0

    canary_tokens = sum(s.shape[0] for s in sims_canary)
    canary_fired = sum(int((s >= tau).any(1).sum()) for s in sims_canary)

    # Per-fact thresholds from the calibration lines.
    m = torch.stack([s.amax(0) for s in sims_calib]).amax(0)  # (F,)
    para = torch.full((n_facts,), -1.0)
    with handle.reading():
        for i, fact in enumerate(facts):
            for x in token_inputs(handle, module, fact.get("paraphrase_prompts") or []):
                para[i] = max(float(para[i]), float((embed(x, projection) @ keys[i]).max()))
    has_para = torch.tensor([bool(f.get("paraphrase_prompts")) for f in facts])
    per_fact_tau = []
    for margin in (None, *MARGINS):
        t_f = torch.full((n_facts,), tau) if margin is None else (m + margin).clamp(min=tau)
        fired_e = sum(int((s >= t_f).any(1).sum()) for s in sims_eval)
        fired_c = sum(int((s >= t_f).any(1).sum()) for s in sims_canary)
        per_fact_tau.append(
            {
                "margin": margin,
                "facts_raised": int((t_f > tau).sum()),
                "mean_threshold": float(t_f.mean()),
                "text_fires": fired_e / tokens,
                "canary_fires": fired_c / canary_tokens,
                "paraphrase_opens": float((para[has_para] >= t_f[has_para]).float().mean()),
            }
        )
    print(
        json.dumps(
            {
                "store": str(args.store),
                "facts": n_facts,
                "threshold": tau,
                "text_tokens": tokens,
                "text_fires": fired_tokens / tokens,
                "canary_tokens": canary_tokens,
                "canary_fires": canary_fired / canary_tokens,
                "opens_on_own_subject": right_tokens / fired_tokens if fired_tokens else None,
                "facts_opening": int((per_fact > 0).sum()),
                "opens": opens,
                "share_of_opens_top": {k: top_share(k) for k in (1, 10, 50, 100)},
                "facts_open_per_fired_token": opens / fired_tokens if fired_tokens else None,
                "calibration_texts": len(calibration),
                "per_fact_threshold": per_fact_tau,
                "examples": examples,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
