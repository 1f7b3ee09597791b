"""Counterfactual edit requests drawn from the world, in the fact format of docs/design.md
("Contracts")."""

from __future__ import annotations

import argparse
import json
import random
import sys

from editd.config import Settings
from editd.facts import FactUpdate
from editd.world.world import World, load_world

NEIGHBOURS = 10


def make_requests(n: int, seed: int = 0, world: World | None = None) -> list[FactUpdate]:
    """N edits, each moving one (subject, relation) to a different object of that relation.

    The edit prompt is the relation's first template, the paraphrase is the template that
    subject never saw in training, and the neighbourhood prompts are other subjects whose true
    object equals this request's `target_true` (so an edit that bleeds onto them shows up in
    NS). No two requests share a (subject, relation), and no neighbour is itself edited in that
    relation by the same set, so NS measures bleeding, not other requests' intended effects.
    """
    world = world or load_world()
    facts = world.facts()
    if n > len(facts):
        raise ValueError(f"the world has only {len(facts)} facts; asked for {n}")
    rng = random.Random(seed)
    chosen = rng.sample(facts, n)
    edited = {(f.subject, f.relation) for f in chosen}
    holders: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        holders.setdefault((f.relation, f.object), []).append(f.subject)

    requests = []
    for f in chosen:
        rel = world.relations[f.relation]
        new = rng.choice([o for o in rel.objects if o != f.object])
        pool = [
            s
            for s in holders[(f.relation, f.object)]
            if s != f.subject and (s, f.relation) not in edited
        ]
        neighbours = rng.sample(pool, min(NEIGHBOURS, len(pool)))
        requests.append(
            FactUpdate(
                subject=f.subject,
                prompt=rel.templates[0],
                target_new=new,
                target_true=f.object,
                paraphrase_prompts=(
                    world.heldout_template(f.subject, f.relation).format(f.subject),
                ),
                neighborhood_prompts=tuple(
                    rel.templates[i % 2].format(s) for i, s in enumerate(neighbours)
                ),
            )
        )
    return requests


def unedited_examples(
    requests: list[FactUpdate], n: int, seed: int = 0, world: World | None = None
) -> list[tuple[str, str]]:
    """(prompt, true object) of facts whose subject no request touches: the canary set."""
    world = world or load_world()
    touched = {r.subject for r in requests}
    pool = [f for f in world.facts() if f.subject not in touched]
    rng = random.Random(seed + 1)
    picked = rng.sample(pool, min(n, len(pool)))
    return [
        (world.heldout_template(f.subject, f.relation).format(f.subject), f.object) for f in picked
    ]


def main(args: argparse.Namespace, settings: Settings) -> int:
    requests = make_requests(args.n, args.seed)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        for r in requests:
            out.write(json.dumps(r.model_dump(exclude={"schema_version"}), ensure_ascii=False))
            out.write("\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
