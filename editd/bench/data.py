"""Real datasets for the benchmarks: CounterFact (own or EasyEdit format) and zsRE records.

Records are drawn reproducibly by seed. The last `HELDOUT_SHARE` of a file is kept for
choosing a model's profile (`editd model profile`), so the settings a benchmark scores were
never tuned on the records it scores.
"""

from __future__ import annotations

import random
from pathlib import Path

from editd.config import FactLimits
from editd.facts import FactUpdate

HELDOUT_SHARE = 0.2


def load_dataset(path: str | Path) -> list[FactUpdate]:
    """Every record of the file that validates and names its true object, in file order."""
    from editd.consumers.publish import load_facts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    # Scoring needs the true object; records without one are not usable here.
    loaded = load_facts(path.read_text(encoding="utf-8"), FactLimits())
    facts = [f for f in loaded.facts if f.target_true]
    if not facts:
        raise ValueError(f"{path}: no record with a true object (ground_truth / target_true)")
    return facts


def split(facts: list[FactUpdate], part: str) -> list[FactUpdate]:
    """`"eval"`: the first 1 − HELDOUT_SHARE of the records; `"heldout"`: the rest."""
    cut = int(len(facts) * (1 - HELDOUT_SHARE))
    if part == "eval":
        return facts[:cut]
    if part == "heldout":
        return facts[cut:]
    raise ValueError(f"unknown split {part!r}")


def draw(
    facts: list[FactUpdate], n: int, seed: int, *, exclude_subjects: set[str] = frozenset()
) -> list[FactUpdate]:
    """`n` records with distinct subjects, drawn by `seed`."""
    pool = list(facts)
    random.Random(seed).shuffle(pool)
    out: list[FactUpdate] = []
    seen = set(exclude_subjects)
    for f in pool:
        if f.subject in seen:
            continue
        seen.add(f.subject)
        out.append(f)
        if len(out) == n:
            return out
    raise ValueError(f"the dataset holds only {len(out)} usable records with distinct subjects")


def others_for_known(
    facts: list[FactUpdate], requests: list[FactUpdate], n: int, seed: int
) -> list[FactUpdate]:
    """Up to `n` records whose subjects no request edits, to check known facts against.

    They come from the evaluation split, as long as it has `n` subjects left over. A run that
    edits nearly every subject of the split (CounterFact's ~7,700) leaves too few, and then
    they come from the held-out split: it only ever chose settings, and these records are
    checked, never edited or tuned on.
    """
    edited = {f.subject for f in requests}
    pool = split(facts, "eval")
    left = len({f.subject for f in pool} - edited)
    if left < n:
        pool = split(facts, "heldout")
        left = len({f.subject for f in pool} - edited)
    if min(left, n) == 0:
        return []
    return draw(pool, min(left, n), seed, exclude_subjects=edited)
