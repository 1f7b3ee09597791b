"""The evaluator: sampling, export, policy actions, scheduling.

The score callable is the daemon's injection point; here it is a deterministic table of scores
per model version (the rollback logic is what is under test). A second file
(test_monitoring_evaluator_torch.py) drives the same evaluator with a real Llama and the real
scorer.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from editd.config import EvalSettings
from editd.monitoring.evaluator import AppliedSample, Evaluator
from editd.monitoring.metrics import Metrics
from editd.monitoring.policy import Baseline, Measurement, Policy, Thresholds


@dataclass(frozen=True)
class S:
    es: float
    ps: float
    ns: float
    s: float


@dataclass(frozen=True)
class Fact:
    id: str


GOOD = S(1.0, 0.9, 0.9, 0.93)
BAD = S(0.3, 0.2, 0.4, 0.27)
PROBE = S(0.0, 0.0, 0.95, 0.0)
POLICY = Policy(
    applied=Thresholds(es=0.8, ps=0.5, ns=0.7),
    probe=Thresholds(ns=0.8),
    min_canary_ratio=0.9,
    failures_before_rollback=1,
)


class Model:
    """A served model's version pointer with per-version scores, and the rollback it allows."""

    def __init__(self, scores: dict[int, S]) -> None:
        self.version = 0
        self.scores = scores
        self.calls: list[tuple[int, int, int]] = []  # (version, sample size, probe size)
        self.rollbacks: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.fail = False
        self.started: list[int] = []  # versions whose scoring has begun, in order
        # Cleared by a test to hold a scoring run after it has read the version.
        self.proceed = threading.Event()
        self.proceed.set()

    def score(self, sample: Sequence[Fact], probe: Sequence[Fact]) -> Measurement:
        with self.lock:
            version = self.version
        self.started.append(version)
        if not self.proceed.wait(10):
            raise RuntimeError("the test never let the scorer proceed")
        if self.fail:
            raise RuntimeError("scorer crashed")
        self.calls.append((version, len(sample), len(probe)))
        self.last_sample = [f.id for f in sample]
        applied = self.scores[version] if sample else None
        return Measurement(version=version, applied=applied, probe=PROBE, canary=0.95)

    def rollback(self, to_version: int, reason: str) -> None:
        with self.lock:
            self.version = to_version
        self.rollbacks.append((to_version, reason))


def facts(prefix: str, n: int) -> list[Fact]:
    return [Fact(f"{prefix}{i}") for i in range(n)]


def make(model: Model, **kw) -> tuple[Evaluator[Fact], Metrics]:
    metrics = Metrics(CollectorRegistry())
    args = dict(
        score=model.score,
        rollback=model.rollback,
        policy=POLICY,
        metrics=metrics,
        probe_facts=facts("p", 5),
        sample_size=8,
        interval_seconds=3600,
        after_each_version=False,
    )
    args.update(kw)
    return Evaluator(**args), metrics


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# -- the sample ----------------------------------------------------------------------------


def test_reservoir_is_uniform_and_bounded() -> None:
    counts = dict.fromkeys(range(100), 0)
    for seed in range(400):
        sample = AppliedSample[Fact](10, seed=seed)
        for v in range(10):
            sample.add(v + 1, facts(f"{v * 10}:", 10))
        sample.add(11, [])  # an empty version leaves nothing of its own in the sample
        picked = sample.sample()
        assert len(picked) == 10
        for f in picked:
            a, b = f.id.split(":")
            counts[int(a) + int(b)] += 1
    # each of the 100 facts is kept with probability 10/100: 40 times in 400 draws
    assert min(counts.values()) > 15 and max(counts.values()) < 70
    assert sample.seen == 100


def test_sample_holds_the_newest_version_and_forgets_undone_ones() -> None:
    sample = AppliedSample[Fact](4, seed=1)
    sample.add(1, facts("a", 100))
    sample.add(2, facts("b", 3))
    picked = {f.id for f in sample.sample()}
    assert {"b0", "b1", "b2"} <= picked  # the whole newest batch, whatever the reservoir holds
    assert len(picked) <= 4 + 3
    sample.drop_after(1)
    assert not any(f.id.startswith("b") for f in sample.sample())
    assert sample.seen == 100
    sample.drop_after(0)
    assert sample.sample() == [] and sample.seen == 0
    # duplicates (the same fact applied in two versions) appear once
    sample.add(3, facts("c", 2))
    sample.add(4, facts("c", 2))
    assert [f.id for f in sample.sample()] == ["c0", "c1"]
    with pytest.raises(ValueError):
        AppliedSample[Fact](0)


# -- one evaluation ------------------------------------------------------------------------


def test_evaluate_exports_scores_drift_and_baseline_from_version_zero() -> None:
    model = Model({0: GOOD, 1: GOOD})
    ev, metrics = make(model, clock=lambda: 1234.5)
    get = metrics.registry.get_sample_value
    assert ev.baseline is None
    assert get("editd_score_threshold", {"set": "applied", "score": "es"}) == 0.8
    assert get("editd_canary_threshold") == 0.0  # relative: unknown until the baseline

    first = ev.evaluate()
    assert first.version == 0 and first.passed
    assert model.calls == [(0, 0, 5)]
    assert ev.baseline == Baseline(probe=PROBE, canary=0.95)
    assert get("editd_canary_threshold") == pytest.approx(0.855)
    # nothing applied yet: undefined, so no alert compares it to its minimum
    assert math.isnan(get("editd_score", {"set": "applied", "score": "es"}))
    assert get("editd_score", {"set": "probe", "score": "ns"}) == 0.95
    assert get("editd_score_drift", {"set": "probe", "score": "ns"}) == 0.0
    assert get("editd_canary") == 0.95 and get("editd_canary_drift") == 0.0
    assert get("editd_last_evaluation_timestamp_seconds") == 1234.5
    assert get("editd_evaluations_total", {"outcome": "passed"}) == 1

    model.version = 1
    ev.record_version(1, facts("a", 3))
    second = ev.evaluate()
    assert model.calls[-1] == (1, 3, 5)
    assert second.passed and ev.last == second
    assert get("editd_score", {"set": "applied", "score": "es"}) == 1.0
    assert get("editd_evaluated_version") == 1
    assert get("editd_evaluation_seconds_count") == 2
    assert second.as_dict()["applied"] == {"es": 1.0, "ps": 0.9, "ns": 0.9, "s": 0.93}
    assert model.rollbacks == []


def test_a_failing_version_is_rolled_back_to_the_last_good_one() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: GOOD, 3: BAD})
    ev, metrics = make(model)
    assert ev.status()["last_evaluation"] is None and ev.status()["last_rollback"] is None
    ev.evaluate()  # version 0: the baseline
    for v in (1, 2):
        model.version = v
        ev.record_version(v, facts(f"v{v}-", 4))
        assert ev.evaluate().passed
    model.version = 3
    ev.record_version(3, facts("v3-", 4))
    failed = ev.evaluate()
    assert not failed.passed
    assert [f.check for f in failed.failures] == ["applied_es", "applied_ps", "applied_ns"]
    assert [v for v, _ in model.rollbacks] == [2]
    assert "version 3 failed" in model.rollbacks[0][1]
    status = ev.status()
    assert status["last_rollback"]["from_version"] == 3
    assert status["last_rollback"]["to_version"] == 2
    assert status["last_rollback"]["reason"] == "applied_es"
    assert status["thresholds"]["applied"]["es"] == 0.8
    assert status["thresholds"]["canary"] == pytest.approx(0.855)
    assert status["baseline"]["probe"]["ns"] == 0.95
    json.dumps(status, allow_nan=False)  # what the HTTP API returns
    get = metrics.registry.get_sample_value
    assert get("editd_rollbacks_total", {"reason": "applied_es"}) == 1
    assert get("editd_evaluations_total", {"outcome": "failed"}) == 1
    # the failing streak left the history, and version 3's facts the sample
    assert all(e.version <= 2 for e in ev.history)
    again = ev.evaluate()
    assert again.version == 2 and again.passed and len(model.rollbacks) == 1
    assert 0 < len(model.last_sample) <= 8
    assert not any(f.startswith("v3-") for f in model.last_sample)


def test_consecutive_failures_before_acting() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: BAD})
    policy = Policy(applied=Thresholds(es=0.8), failures_before_rollback=3)
    ev, _ = make(model, policy=policy)
    model.version = 1
    ev.record_version(1, facts("a", 2))
    ev.evaluate()
    model.version = 2
    ev.record_version(2, facts("b", 2))
    ev.evaluate()
    ev.evaluate()
    assert model.rollbacks == []
    ev.evaluate()
    assert [v for v, _ in model.rollbacks] == [1]


def test_no_rollback_when_the_base_model_itself_fails() -> None:
    model = Model({0: BAD, 1: BAD})
    ev, _ = make(model, policy=Policy(probe=Thresholds(ns=0.99)))
    assert not ev.evaluate().passed  # probe NS 0.95 < 0.99 even for the base model
    model.version = 1
    ev.record_version(1, facts("a", 2))
    assert not ev.evaluate().passed
    assert model.rollbacks == []  # rolling back could not satisfy these thresholds


def test_a_failed_rollback_is_retried_on_the_next_evaluation() -> None:
    model = Model({0: GOOD, 1: BAD})
    attempts = []

    def flaky_rollback(to_version: int, reason: str) -> None:
        attempts.append(to_version)
        if len(attempts) == 1:
            raise OSError("store unavailable")
        model.rollback(to_version, reason)

    ev, metrics = make(model, rollback=flaky_rollback)
    model.version = 1
    ev.record_version(1, facts("a", 2))
    ev.evaluate()
    assert attempts == [0] and model.version == 1
    assert metrics.registry.get_sample_value("editd_rollbacks_total", {"reason": "applied_es"}) == 0
    ev.evaluate()
    assert attempts == [0, 0] and model.version == 0


def test_scorer_errors_are_counted_and_raised() -> None:
    model = Model({0: GOOD})
    ev, metrics = make(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="scorer crashed"):
        ev.evaluate()
    assert metrics.registry.get_sample_value("editd_evaluations_total", {"outcome": "error"}) == 1
    assert ev.last is None


def test_a_measurement_overtaken_by_a_rollback_is_discarded() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: BAD})
    ev, metrics = make(model)
    model.version = 2
    ev.record_version(1, facts("a", 2), evaluate=False)
    ev.record_version(2, facts("b", 2), evaluate=False)
    result: list = []
    model.proceed.clear()
    t = threading.Thread(target=lambda: result.append(ev.evaluate()))
    t.start()
    wait_for(lambda: model.started == [2])
    # An operator rolls back while version 2 is being scored.
    model.rollback(1, "operator")
    ev.rolled_back(1)
    model.proceed.set()
    t.join(10)
    assert result[0].version == 2 and not result[0].passed
    assert ev.history == []  # not recorded, not acted upon
    assert model.rollbacks == [(1, "operator")]
    assert metrics.registry.get_sample_value("editd_evaluated_version") == 0.0


def test_from_settings() -> None:
    model = Model({0: GOOD})
    settings = EvalSettings(
        interval_seconds=5, sample_size=16, min_es=0.95, after_each_version=False
    )
    ev = Evaluator.from_settings(
        settings,
        score=model.score,
        rollback=model.rollback,
        metrics=Metrics(),
        probe_facts=facts("p", 2),
    )
    assert ev.interval_seconds == 5 and not ev.after_each_version
    assert ev.policy == Policy.from_settings(settings)
    assert ev.policy.applied.es == 0.95


# -- scheduling ----------------------------------------------------------------------------


def test_scheduler_runs_at_start_then_scores_each_interval_only_what_changed() -> None:
    model = Model({0: GOOD, 1: GOOD})
    ev, metrics = make(model, interval_seconds=0.2, served_version=lambda: model.version)

    def skipped() -> float:
        value = metrics.registry.get_sample_value("editd_evaluations_total", {"outcome": "skipped"})
        return value or 0.0

    before = set(threading.enumerate())
    with ev:
        wait_for(lambda: skipped() >= 2, timeout=5)
        assert [v for v, _, _ in model.calls] == [0]  # the immediate run only
        model.version = 1
        ev.record_version(1, facts("a", 2), evaluate=False)
        wait_for(lambda: model.calls[-1][0] == 1, timeout=5)
        then = skipped()
        wait_for(lambda: skipped() >= then + 2, timeout=5)
    n = len(model.calls)
    assert [v for v, _, _ in model.calls] == [0, 1]
    # Stopped: the scheduler's threads were joined, so nothing is left to call the scorer.
    assert set(threading.enumerate()) - before == set()
    assert len(model.calls) == n
    assert metrics.registry.get_sample_value("editd_evaluations_total", {"outcome": "passed"}) == n


def test_two_scheduled_runs_on_an_unchanged_version_score_once() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: GOOD})
    now = [100.0]
    ev, metrics = make(model, served_version=lambda: model.version, clock=lambda: now[0])
    assert ev.scheduled() is not None
    now[0] = 160.0
    assert ev.scheduled() is None
    assert len(model.calls) == 1
    get = metrics.registry.get_sample_value
    assert get("editd_evaluations_total", {"outcome": "skipped"}) == 1
    assert get("editd_evaluations_total", {"outcome": "passed"}) == 1
    # The scores exported still describe the served version: not stale for the alert.
    assert get("editd_last_evaluation_timestamp_seconds") == 160.0
    assert ev.status()["skipped"] == 1
    # An operator's `editd eval` scores whatever changed.
    assert ev.evaluate().version == 0 and len(model.calls) == 2
    # A version the evaluator was not told about is still seen through `served_version`.
    model.version = 1
    assert ev.scheduled() is not None and model.calls[-1][0] == 1
    assert ev.scheduled() is None
    # New facts in the sample are scored, on a new version or after a rollback.
    model.version = 2
    ev.record_version(2, facts("b", 2), evaluate=False)
    assert ev.scheduled() is not None and model.calls[-1][:2] == (2, 2)
    model.version = 1
    ev.rolled_back(1)
    assert ev.scheduled() is not None and model.calls[-1][:2] == (1, 0)
    assert ev.scheduled() is None
    assert get("editd_evaluations_total", {"outcome": "skipped"}) == 3


def test_a_failing_version_is_scored_again_until_its_streak_rolls_it_back() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: BAD})
    policy = Policy(applied=Thresholds(es=0.8), failures_before_rollback=3)
    ev, _ = make(model, policy=policy, served_version=lambda: model.version)
    model.version = 1
    ev.record_version(1, facts("a", 2))
    assert ev.scheduled() is not None
    model.version = 2
    ev.record_version(2, facts("b", 2))
    for _ in range(3):
        assert ev.scheduled() is not None  # unchanged, but its last evaluation failed
    assert [v for v, _ in model.rollbacks] == [1]


def test_after_each_version_triggers_an_evaluation_and_rolls_back_by_itself() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: BAD})
    ev, metrics = make(model, after_each_version=True)
    with ev:
        wait_for(lambda: len(model.calls) == 1)  # the immediate first run
        model.version = 1
        ev.record_version(1, facts("a", 4))
        wait_for(lambda: model.calls[-1][0] == 1)
        model.version = 2
        ev.record_version(2, facts("b", 4))
        wait_for(
            lambda: model.rollbacks == [(1, model.rollbacks[0][1])] if model.rollbacks else False
        )
        # after the rollback the restored version is re-scored, so the gauges show it
        wait_for(lambda: metrics.registry.get_sample_value("editd_evaluated_version") == 1)
    assert metrics.registry.get_sample_value("editd_rollbacks_total", {"reason": "applied_es"}) == 1
    assert ev.last is not None and ev.last.version == 1 and ev.last.passed


def test_triggers_during_a_running_evaluation_are_not_lost() -> None:
    model = Model({0: GOOD, 1: GOOD, 2: GOOD})
    ev, _ = make(model, after_each_version=True)
    with ev:
        wait_for(lambda: len(model.calls) == 1)
        model.proceed.clear()
        model.version = 1
        ev.record_version(1, facts("a", 1))
        wait_for(lambda: model.started[-1] == 1)  # the triggered run is scoring version 1
        model.version = 2
        ev.record_version(2, facts("b", 1))  # arrives mid-run
        model.proceed.set()
        wait_for(lambda: model.calls[-1][0] == 2, timeout=5)
    versions = [v for v, _, _ in model.calls]
    assert versions[:2] == [0, 1] and versions[-1] == 2
    assert len(versions) <= 4  # coalesced, not one run per request


def test_drift_is_exported_against_a_given_baseline() -> None:
    model = Model({3: GOOD})
    model.version = 3
    base = Baseline(probe=S(0.0, 0.0, 1.0, 0.0), canary=1.0)
    ev, metrics = make(model, baseline=base)
    ev.record_version(3, facts("a", 2))
    ev.evaluate()
    get = metrics.registry.get_sample_value
    assert get("editd_score_drift", {"set": "probe", "score": "ns"}) == pytest.approx(-0.05)
    assert get("editd_canary_drift") == pytest.approx(-0.05)
    assert get("editd_canary_threshold") == pytest.approx(0.9)
    assert math.isclose(get("editd_score", {"set": "applied", "score": "s"}), 0.93)
