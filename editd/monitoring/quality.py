"""What the evaluator's checks measure a served model with: the canary, the probe set, and
`measure`, which scores one version of a model through them.

The evaluator (evaluator.py) judges the numbers it is handed and imports no torch; this module
produces them, through the editing package's scoring, and is imported only where a model is
loaded (the daemon). The sets are chosen once per start:

- the probe set (facts that must not change): the facts of `eval.probe_file`, else the built-in
  world's probe facts, else the canary's prompts with the base model's own answers;
- the canary (prompts whose greedy answers must stay): the built-in world's unedited facts, or
  a real model's own answers to the shipped prompts (canary.py), asked once per model and kept
  in the stats cache beside C0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editd import durable
from editd.facts import FactUpdate
from editd.monitoring.canary import canary_prompts, own_answer_probes
from editd.monitoring.policy import Measurement

log = logging.getLogger(__name__)

PROBE_SEED = 7_919  # the built-in model's probe facts: fixed, so scores compare across runs
CHECKS = ("applied", "probe", "canary")


@dataclass(frozen=True)
class Canary:
    """Prompts whose greedy completions must stay right: the general-ability check."""

    prompts: tuple[str, ...]
    objects: tuple[str, ...]


@dataclass(frozen=True)
class EvaluationSets:
    """The probe facts, the canary, and the checks that are off with why."""

    canary: Canary | None
    probes: list[FactUpdate]
    off: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def base_reading(handle: Any) -> Iterator[int]:
    """Read the base model (version 0) through `handle`, whatever version it serves."""
    with handle.reading(), handle.base_view():
        yield 0


def measure(
    handle: Any,
    reading: contextlib.AbstractContextManager[int],
    sample: Sequence[FactUpdate],
    probe: Sequence[FactUpdate],
    canary: Canary | None,
) -> Measurement:
    """Score what `handle` serves inside one `reading` (which yields the version read), so
    every number describes one version."""
    from editd.editing.scoring import canary_accuracy, score_facts

    with reading as version:
        m, tok = handle.model, handle.tokenizer
        applied = score_facts(m, tok, sample) if sample else None
        probe_scores = score_facts(m, tok, probe)
        counter = getattr(handle, "gate_counter", None)
        mine = counter.mine() if counter is not None else None
        seen = (mine.tokens, mine.fired) if mine is not None else (0, 0)
        canary_score = (
            canary_accuracy(m, tok, list(canary.prompts), list(canary.objects)) if canary else None
        )
        gated = getattr(handle, "memory", None) is not None
        tokens = mine.tokens - seen[0] if mine is not None else 0
        fires = (mine.fired - seen[1]) / tokens if gated and mine is not None and tokens else None
    return Measurement(
        version=version,
        applied=applied,
        probe=probe_scores,
        canary=canary_score,
        gate_fires=fires,
    )


def evaluation_sets(
    handle: Any,
    *,
    builtin: bool,
    probe_size: int,
    cache_dir: Path,
    probe_file_facts: Sequence[FactUpdate] | None = None,
) -> EvaluationSets:
    """The probe facts (must not change), the canary, and the checks that are off and why.

    `probe_file_facts`: the facts of `eval.probe_file`, read by the caller (the file formats
    are the publisher's), or None when no file is configured.
    """
    probes: list[FactUpdate] = []
    if probe_file_facts is not None:
        probes = list(probe_file_facts)
    elif builtin:
        from editd.world.requests import make_requests

        probes = make_requests(probe_size, seed=PROBE_SEED)
    probes = [as_probe(f) for f in probes[:probe_size]]
    if builtin:
        from editd.world.requests import unedited_examples

        pairs = unedited_examples(probes, probe_size, seed=PROBE_SEED)
        canary = Canary(tuple(p for p, _ in pairs), tuple(o for _, o in pairs))
        return EvaluationSets(canary, probes)
    canary = model_canary(handle, cache_dir)
    if not probes:
        own = own_answer_probes(canary.prompts, canary.objects, probe_size)
        probes = [as_probe(f) for f in own]
        log.info("probe set: %d of the canary's prompts, the base model's answers", len(probes))
    off = {} if probes else {"probe": "no probe set: set eval.probe_file to a facts file"}
    return EvaluationSets(canary, probes, off)


def model_canary(handle: Any, cache_dir: Path) -> Canary:
    """A real model's canary: its own answers to the shipped general-knowledge prompts.

    Asked once per model and prompt set and kept beside C0 (docs/design.md gives what asking
    costs), since they are the unedited model's and never change.
    """
    from editd.editing.scoring import canary_pairs

    asked = canary_prompts()
    digest = hashlib.sha256("\n".join(asked).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"canary-{handle.identity}-{digest}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        prompts, answers = saved["prompts"], saved["answers"]
    else:
        # The base model's own answers, whatever version is served by now.
        with handle.reading(), handle.base_view():
            prompts, answers = canary_pairs(handle.model, handle.tokenizer, asked)
        durable.write_bytes(path, json.dumps({"prompts": prompts, "answers": answers}).encode())
    log.info("canary: %d prompts the base model answers itself", len(prompts))
    return Canary(tuple(prompts), tuple(answers))


def as_probe(fact: FactUpdate) -> FactUpdate:
    """A fact that must not change: its own prompts join its neighbourhood, so NS asks that
    the model keeps preferring the true object on all of them."""
    own = (fact.rendered_prompt, *fact.paraphrase_prompts)
    return fact.model_copy(
        update={"neighborhood_prompts": own + fact.neighborhood_prompts, "paraphrase_prompts": ()}
    )
