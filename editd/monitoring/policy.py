"""When to roll back, and to which version: pure functions over evaluation records.

The evaluator measures; this module judges. `check` turns one measurement into the list of
failed checks, `should_roll_back` reads the recent evaluations and decides, `choose_target`
picks the version to restore. None of them does I/O or keeps state, so the whole policy is
tested with tables of cases (tests/test_monitoring_policy.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from editd.config import EvalSettings
from editd.monitoring.metrics import SCORES, ScoreSet


@dataclass(frozen=True)
class Thresholds:
    """Minimum per score for one fact set; 0 means the score is not checked."""

    es: float = 0.0
    ps: float = 0.0
    ns: float = 0.0
    s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SCORES}


@dataclass(frozen=True)
class Policy:
    """The rollback policy, built once from `settings.eval`.

    `applied` guards the sample of facts applied so far (they must stay learnt), `probe` guards
    the probe facts that no edit may change (only their NS means anything: the model should go
    on preferring their true objects). The canary is checked relative to the base model's, since
    its absolute level depends on the model: `min_canary_ratio` 0.9 allows a 10 % loss.
    """

    applied: Thresholds = Thresholds()
    probe: Thresholds = Thresholds()
    min_canary_ratio: float = 0.0
    failures_before_rollback: int = 1
    # Warned about (exported for the alert), never rolled back for: see EvalSettings.
    max_norm_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.failures_before_rollback < 1:
            raise ValueError("failures_before_rollback must be at least 1")

    @classmethod
    def from_settings(cls, settings: EvalSettings) -> Policy:
        return cls(
            applied=Thresholds(
                es=settings.min_es, ps=settings.min_ps, ns=settings.min_ns, s=settings.min_s
            ),
            probe=Thresholds(ns=settings.min_probe_ns),
            min_canary_ratio=settings.min_canary_ratio,
            failures_before_rollback=settings.failures_before_rollback,
            max_norm_ratio=settings.max_norm_ratio,
        )

    def canary_minimum(self, base_canary: float | None) -> float:
        """The absolute canary floor; 0 (unchecked) until the base model's canary is known."""
        if base_canary is None:
            return 0.0
        return self.min_canary_ratio * base_canary


@dataclass(frozen=True)
class Measurement:
    """What one scoring pass returns. All of it was read from the single model `version`."""

    version: int
    applied: ScoreSet | None  # None while no fact has been applied (version 0)
    probe: ScoreSet
    canary: float | None = None
    # Share of the canary's tokens at which a gated memory opened some block (None: no gated
    # memory is served): what the gate leaks into text about nothing edited.
    gate_fires: float | None = None


@dataclass(frozen=True)
class Baseline:
    """The base model's (version 0) scores on the probe set, the reference for drift."""

    probe: ScoreSet
    canary: float | None = None


@dataclass(frozen=True)
class Failure:
    """One failed check. `check` is from a small fixed set: it labels the rollback metric."""

    check: str  # one of metrics.ROLLBACK_REASONS: "applied_es", "probe_ns", "canary", ...
    value: float
    minimum: float

    def __str__(self) -> str:
        return f"{self.check} {self.value:.3f} < {self.minimum:.3f}"


@dataclass(frozen=True)
class Evaluation:
    """One judged measurement, kept in the evaluator's history."""

    measurement: Measurement
    failures: tuple[Failure, ...]
    finished_at: float  # unix seconds
    seconds: float = 0.0

    @property
    def version(self) -> int:
        return self.measurement.version

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None): for `editd eval`, `editd status` and the logs."""
        m = self.measurement
        return {
            "version": m.version,
            "passed": self.passed,
            "failures": [
                {"check": f.check, "value": _num(f.value), "minimum": f.minimum}
                for f in self.failures
            ],
            "applied": scores_dict(m.applied),
            "probe": scores_dict(m.probe),
            "canary": _num(m.canary),
            "finished_at": self.finished_at,
            "seconds": self.seconds,
        }


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def scores_dict(scores: ScoreSet | None) -> dict[str, float | None] | None:
    """es/ps/ns/s as a JSON-ready dict (NaN becomes None)."""
    if scores is None:
        return None
    return {name: _num(getattr(scores, name)) for name in SCORES}


@dataclass(frozen=True)
class Decision:
    roll_back: bool
    target: int | None = None
    reason: str = ""  # metric label: the first failed check of the latest evaluation
    version: int | None = field(default=None, compare=False)  # the version judged
    detail: str = field(default="", compare=False)  # for logs and the rejected-topic header


def check(
    measurement: Measurement, policy: Policy, baseline: Baseline | None
) -> tuple[Failure, ...]:
    """Every check `measurement` fails under `policy`, in a fixed order (applied, probe, canary)."""
    failures: list[Failure] = []
    for set_name, scores, thresholds in (
        ("applied", measurement.applied, policy.applied),
        ("probe", measurement.probe, policy.probe),
    ):
        if scores is None:
            continue
        for name, minimum in thresholds.as_dict().items():
            value = float(getattr(scores, name))
            # NaN means the facts had no prompts of this kind (the scorer's convention): there
            # is nothing to judge. A broken model yields low scores, not NaN.
            if minimum > 0 and not math.isnan(value) and value < minimum:
                failures.append(Failure(f"{set_name}_{name}", value, minimum))
    canary_min = policy.canary_minimum(baseline.canary if baseline else None)
    canary = measurement.canary
    if canary is not None and canary_min > 0 and not math.isnan(canary) and canary < canary_min:
        failures.append(Failure("canary", canary, canary_min))
    return tuple(failures)


def choose_target(verdicts: Iterable[tuple[int, bool]], below: int) -> int | None:
    """The newest version older than `below` whose latest evaluation passed.

    `verdicts` are (version, passed) pairs in time order; a later verdict of a version overrides
    an earlier one. The base model (version 0) is trusted unless it was evaluated and failed:
    then no target exists, because the thresholds reject even the unedited model and rolling
    back could not satisfy them.
    """
    latest: dict[int, bool] = {0: True}
    for version, passed in verdicts:
        latest[version] = passed
    passing = [v for v, ok in latest.items() if ok and v < below]
    return max(passing) if passing else None


def failing_streak(history: Sequence[Evaluation]) -> int:
    """How many evaluations at the end of `history` failed in a row."""
    streak = 0
    for evaluation in reversed(history):
        if evaluation.passed:
            break
        streak += 1
    return streak


def should_roll_back(
    history: Sequence[Evaluation],
    policy: Policy,
    verdicts: Mapping[int, bool] | None = None,
) -> Decision:
    """Decide from the evaluations of live versions (oldest first) whether to roll back.

    Acts once the last `policy.failures_before_rollback` evaluations all failed, and targets
    the newest older version that passed. `verdicts` maps each live version to whether its
    latest evaluation passed; by default it is read from `history` (pass it when the history
    kept is shorter than the versions seen).
    """
    if not history:
        return Decision(False, detail="no evaluation yet")
    latest = history[-1]
    streak = failing_streak(history)
    needed = policy.failures_before_rollback
    if streak < needed:
        if streak == 0:
            return Decision(False, detail=f"version {latest.version} passed")
        return Decision(False, detail=f"{streak}/{needed} consecutive failed evaluations")
    if latest.version == 0:
        return Decision(False, detail="the base model fails the thresholds; nothing to undo")
    pairs = (
        list(verdicts.items()) if verdicts is not None else [(e.version, e.passed) for e in history]
    )
    target = choose_target(pairs, below=latest.version)
    failed = "; ".join(str(f) for f in latest.failures)
    if target is None:
        return Decision(
            False,
            reason=latest.failures[0].check,
            version=latest.version,
            detail=f"version {latest.version} failed ({failed}) but no older version passed",
        )
    return Decision(
        True,
        target=target,
        reason=latest.failures[0].check,
        version=latest.version,
        detail=(
            f"version {latest.version} failed {streak} evaluation(s) in a row ({failed}); "
            f"rolling back to version {target}"
        ),
    )
