"""The rollback policy, as tables of cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from editd.config import EvalSettings
from editd.monitoring.policy import (
    Baseline,
    Decision,
    Evaluation,
    Failure,
    Measurement,
    Policy,
    Thresholds,
    check,
    choose_target,
    failing_streak,
    should_roll_back,
)


@dataclass(frozen=True)
class S:
    es: float
    ps: float
    ns: float
    s: float


GOOD = S(1.0, 0.9, 0.9, 0.93)
PROBE = S(0.0, 0.0, 0.95, 0.0)
POLICY = Policy(
    applied=Thresholds(es=0.8, ps=0.5, ns=0.7),
    probe=Thresholds(ns=0.8),
    min_canary_ratio=0.9,
    failures_before_rollback=1,
)
BASE = Baseline(probe=PROBE, canary=0.98)


def m(version: int, applied: S | None = GOOD, probe: S = PROBE, canary: float | None = 0.97):
    return Measurement(version=version, applied=applied, probe=probe, canary=canary)


@pytest.mark.parametrize(
    ("measurement", "baseline", "expected"),
    [
        (m(3), BASE, []),
        (m(0, applied=None), None, []),
        (m(3, applied=S(0.5, 0.9, 0.9, 0.7)), BASE, ["applied_es"]),
        (m(3, applied=S(0.79, 0.4, 0.6, 0.5)), BASE, ["applied_es", "applied_ps", "applied_ns"]),
        # exactly at the minimum passes
        (m(3, applied=S(0.8, 0.5, 0.7, 0.65)), BASE, []),
        (m(3, probe=S(0.0, 0.0, 0.79, 0.0)), BASE, ["probe_ns"]),
        # probe ES/PS are not checked: the model must NOT state a probe's counterfactual object
        (m(3, probe=S(0.0, 0.0, 0.9, 0.0)), BASE, []),
        # canary floor is 0.9 x 0.98 = 0.882
        (m(3, canary=0.88), BASE, ["canary"]),
        (m(3, canary=0.883), BASE, []),
        # no baseline yet: the relative canary check cannot run
        (m(3, canary=0.1), None, []),
        (m(3, canary=None), BASE, []),
        # NaN = no prompts of that kind (facts without paraphrases): nothing to judge
        (m(3, applied=S(0.9, float("nan"), 0.9, 0.9)), BASE, []),
        (m(3, applied=S(0.1, float("nan"), 0.9, 0.18)), BASE, ["applied_es"]),
        (m(3, canary=float("nan")), BASE, []),
    ],
)
def test_check(measurement: Measurement, baseline: Baseline | None, expected: list[str]) -> None:
    assert [f.check for f in check(measurement, POLICY, baseline)] == expected


def test_check_reports_values() -> None:
    (failure,) = check(m(2, applied=S(0.5, 0.9, 0.9, 0.7)), POLICY, BASE)
    assert failure == Failure("applied_es", 0.5, 0.8)
    assert str(failure) == "applied_es 0.500 < 0.800"


def ev(version: int, passed: bool) -> Evaluation:
    failures = () if passed else (Failure("applied_es", 0.1, 0.8),)
    return Evaluation(measurement=m(version), failures=failures, finished_at=0.0)


P, F = True, False


@pytest.mark.parametrize(
    ("history", "needed", "expected"),
    [
        ([], 1, Decision(False)),
        ([(0, P), (1, P)], 1, Decision(False)),
        ([(0, P), (1, P), (2, F)], 1, Decision(True, 1, "applied_es")),
        # needs two failures in a row
        ([(0, P), (1, P), (2, F)], 2, Decision(False)),
        ([(0, P), (1, P), (2, F), (2, F)], 2, Decision(True, 1, "applied_es")),
        # the streak spans versions: the newer one is undone too, back to the last good
        ([(0, P), (1, P), (2, F), (3, F)], 2, Decision(True, 1, "applied_es")),
        # a pass breaks the streak
        ([(0, P), (2, F), (2, P), (3, F)], 2, Decision(False)),
        # a version that failed earlier but passed later is a valid target (latest verdict wins)
        ([(0, P), (2, F), (2, P), (3, F)], 1, Decision(True, 2, "applied_es")),
        # a version whose latest evaluation failed is not a target
        ([(0, P), (1, P), (2, P), (2, F), (3, F)], 1, Decision(True, 1, "applied_es")),
        # never-evaluated versions are skipped; the base model is trusted
        ([(5, F)], 1, Decision(True, 0, "applied_es")),
        # base model fails: nothing to undo
        ([(0, F)], 1, Decision(False)),
        # base model evaluated and failed, no other version passed: no target
        ([(0, F), (1, F)], 1, Decision(False, None, "applied_es")),
        ([(0, F), (1, P), (2, F)], 1, Decision(True, 1, "applied_es")),
    ],
)
def test_should_roll_back(history: list[tuple[int, bool]], needed: int, expected: Decision) -> None:
    policy = Policy(failures_before_rollback=needed)
    decision = should_roll_back([ev(v, ok) for v, ok in history], policy)
    assert decision == expected
    assert decision.detail  # every decision says why, for the log


def test_verdicts_outlive_a_short_history() -> None:
    # The history kept is only the last few evaluations; verdicts remember older versions.
    history = [ev(9, False)]
    verdicts = {0: True, 4: True, 7: True, 8: False, 9: False}
    decision = should_roll_back(history, POLICY, verdicts)
    assert (decision.target, decision.version) == (7, 9)
    assert should_roll_back(history, POLICY).target == 0


@pytest.mark.parametrize(
    ("verdicts", "below", "expected"),
    [
        ([], 5, 0),
        ([(1, True), (2, True), (3, False)], 3, 2),
        ([(1, True), (2, True), (3, False)], 2, 1),
        ([(1, True), (2, False)], 5, 1),
        ([(0, False)], 5, None),
        ([(0, False), (0, True)], 5, 0),
        ([(4, True), (2, True)], 3, 2),
        ([(1, True)], 0, None),
    ],
)
def test_choose_target(verdicts: list[tuple[int, bool]], below: int, expected: int | None) -> None:
    assert choose_target(verdicts, below) == expected


def test_failing_streak() -> None:
    assert failing_streak([]) == 0
    assert failing_streak([ev(1, False), ev(2, True), ev(3, False), ev(3, False)]) == 2


def test_policy_from_settings() -> None:
    settings = EvalSettings(
        min_es=0.9, min_ps=0.6, min_ns=0.75, min_s=0.1, min_probe_ns=0.85,
        min_canary_ratio=0.95, failures_before_rollback=3,
    )  # fmt: skip
    policy = Policy.from_settings(settings)
    assert policy.applied == Thresholds(es=0.9, ps=0.6, ns=0.75, s=0.1)
    assert policy.probe == Thresholds(ns=0.85)
    assert policy.canary_minimum(0.9) == pytest.approx(0.855)
    assert policy.canary_minimum(None) == 0.0
    assert policy.failures_before_rollback == 3
    with pytest.raises(ValueError, match="at least 1"):
        Policy(failures_before_rollback=0)


def test_check_names_are_the_rollback_reason_labels() -> None:
    from editd.monitoring.metrics import ROLLBACK_REASONS

    everything = Policy(
        applied=Thresholds(1, 1, 1, 1), probe=Thresholds(1, 1, 1, 1), min_canary_ratio=1.0
    )
    zero = S(0.0, 0.0, 0.0, 0.0)
    names = [f.check for f in check(m(1, applied=zero, probe=zero, canary=0.0), everything, BASE)]
    assert [*names, "operator"] == list(ROLLBACK_REASONS)
