"""The general-ability canary's shipped prompt set (see assets/canary_prompts.txt).

The canary watches whether edits damage what a real pretrained model already knew in
general: before any edit the base model's own greedy continuation of each prompt is
recorded, and after edits the same prompts are asked again. No gold answers are needed,
because the reference is the base model itself.

Why a few hundred prompts: the set has to be broad enough that one edit touches few of
them, and large enough that a single flipped continuation is noise rather than alarm.
One flip out of 360 is below 0.3 %, so a threshold of a percent or so tolerates an odd
flip yet still catches an edit that disturbs a whole area of knowledge.

This module imports only the standard library, so reading the prompt set never pulls in
torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from editd.facts import FactUpdate

__all__ = ["CANARY_FILE", "canary_prompts", "own_answer_probes"]

CANARY_FILE: Path = Path(__file__).resolve().parent / "assets" / "canary_prompts.txt"


def canary_prompts(path: Path | None = None) -> tuple[str, ...]:
    """Return the canary prompts from ``path`` (default: the shipped ``CANARY_FILE``).

    A prompt is every line that is not blank and does not start with ``#``, with
    surrounding whitespace stripped, in file order.

    Raises:
        ValueError: naming the file, if it holds no prompt or the same prompt twice,
            compared case-insensitively (a repeated prompt would silently weigh one
            fact double in the flip rate).
    """
    source = CANARY_FILE if path is None else Path(path)
    prompts: list[str] = []
    for raw in source.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{source}: no canary prompts found")
    seen: set[str] = set()
    duplicates: list[str] = []
    for prompt in prompts:
        key = prompt.casefold()
        if key in seen and prompt not in duplicates:
            duplicates.append(prompt)
        seen.add(key)
    if duplicates:
        listed = ", ".join(repr(p) for p in duplicates)
        raise ValueError(f"{source}: duplicate canary prompts: {listed}")
    return tuple(prompts)


def own_answer_probes(prompts: Sequence[str], answers: Sequence[str], n: int) -> list[FactUpdate]:
    """Probe facts for a model with no probe file: up to `n` of its canary prompts, each with
    the base model's own answer as the true object and another prompt's different answer as
    the distractor.

    The probe check then asks, teacher-forced, that the model still prefers its own answer to
    the distractor: the canary's prompts measured by the probe's margin instead of greedy
    agreement, so drift shows before a greedy answer flips. The whole prompt is the subject
    (template "{}"): nothing here is edited, only scored.
    """
    from editd.facts import FactUpdate

    out: list[FactUpdate] = []
    count = len(prompts)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if len(out) >= n:
            break
        distractor = next(
            (
                answers[(i + k) % count]
                for k in range(1, count)
                if answers[(i + k) % count].strip().casefold() != answer.strip().casefold()
            ),
            None,
        )
        if distractor is None or "{" in prompt or "}" in prompt:
            continue
        out.append(
            FactUpdate(
                id=f"probe-{i:04d}",
                subject=prompt,
                prompt="{}",
                target_true=answer,
                target_new=distractor,
            )
        )
    return out
