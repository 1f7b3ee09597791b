"""How often the UNEDITED model states a record's true object greedily, on its edit prompt and
on its paraphrases: the reference a served ES/PS of edited facts is read against. One JSON line.

    python scripts/served_ceiling.py smollm2-135m --dataset counterfact-edit.json --records 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from editd.bench.data import draw, load_dataset, split
from editd.config import Settings
from editd.editing.scoring import greedy_match, prompt_text
from editd.models.factory import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    handle = load_model(Settings(), args.model)
    facts = draw(split(load_dataset(Path(args.dataset)), "eval"), args.records, args.seed)
    prompts: list[str] = []
    objects: list[str] = []
    rows: list[tuple[int, str]] = []  # (fact, "edit" | "paraphrase") per prompt
    for i, fact in enumerate(facts):
        if fact.target_true is None:
            continue
        kinds = (
            ("edit", [fact.rendered_prompt]),
            ("paraphrase", [prompt_text(p, fact.subject) for p in fact.paraphrase_prompts]),
        )
        for kind, texts in kinds:
            for text in texts:
                prompts.append(text)
                objects.append(fact.target_true)
                rows.append((i, kind))
    # Every token of the object the argmax: the greedy continuation starts with it.
    with handle.reading():
        hits = greedy_match(handle.model, handle.tokenizer, prompts, objects)
    per: dict[str, dict[int, list[bool]]] = {"edit": {}, "paraphrase": {}}
    for hit, (i, kind) in zip(hits, rows, strict=True):
        per[kind].setdefault(i, []).append(hit)

    def share(kind: str, only: set[int] | None = None) -> float:
        values = [sum(v) / len(v) for i, v in per[kind].items() if only is None or i in only]
        return sum(values) / len(values) if values else float("nan")

    stated = {i for i, v in per["edit"].items() if v[0]}
    print(
        json.dumps(
            {
                "records": len(per["edit"]),
                "seed": args.seed,
                "true_served_es": share("edit"),
                "true_served_ps": share("paraphrase"),
                "stated_on_edit_prompt": len(stated),
                "true_served_ps_given_stated": share("paraphrase", stated),
            }
        )
    )


if __name__ == "__main__":
    main()
