"""The scheduled evaluator: score the served model, export the scores, roll back when told.

The evaluator owns no model and no Kafka client. The daemon injects two callables:

- `score(sample_facts, probe_facts) -> Measurement`: scores the served model under its read
  lock, so one measurement reads one version and never half-applied weights, and says which
  version it read (`editd.editing.scoring` does the scoring itself);
- `rollback(to_version, reason)`: restores a version through the edit store and publishes the
  undone facts to the rejected topic. The evaluator calls it when the policy says so;
- optionally `served_version() -> int`: the version served now, read without scoring, so a
  scheduled run can tell that nothing changed.

It runs every `eval.interval_seconds` on an APScheduler 3 `BackgroundScheduler` (one instance
at a time, missed runs coalesced), and on request: after each new version (`record_version`),
and synchronously for `editd eval` (`evaluate`). A scheduled run scores only where something
can have changed: it is skipped (`editd_evaluations_total{outcome="skipped"}`) when the served
version is the one the last evaluation scored, that evaluation passed, and the applied-fact
sample has not changed since it was read: scoring the same weights on the same facts gives the
same verdict, and costs as much as any evaluation (README has the figure for SmolLM2).
A failed last evaluation is scored again: the failing streak (`failures_before_rollback`) and
the retry of a rollback that failed both need it. Requested runs (`trigger`, `evaluate`) always
score.

Contract with the daemon:
- `score` returns `applied=None` for an empty sample, and reads the version and the weights
  under one acquisition of the model's read lock.
- `rollback` runs in the evaluator's thread while no other evaluation can start: it must not
  call `evaluate()` (it may call `rolled_back()` or `trigger()`). After it returns, the
  evaluator counts `editd_rollbacks_total{reason=<failed check>}` and forgets the undone
  versions itself.
- A rollback the evaluator did not start (operator, CLI, API): call `rolled_back(version)` and
  count it as `rollbacks.labels(reason="operator")`; the operator's free text goes to the log.
- Every version change reaches the evaluator (`record_version`, `rolled_back`): besides
  `served_version`, that is how a scheduled run knows it has something new to score.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler

from editd.config import SCORE_NAMES, EvalSettings
from editd.monitoring.metrics import Metrics
from editd.monitoring.policy import (
    Baseline,
    Decision,
    Evaluation,
    Measurement,
    Policy,
    check,
    scores_dict,
    should_roll_back,
)

log = logging.getLogger(__name__)

F = TypeVar("F")

ScoreFn = Callable[[Sequence[F], Sequence[F]], Measurement]
RollbackFn = Callable[[int, str], object]

JOB_ID = "editd-evaluate"


def _fact_id(fact: object) -> Hashable:
    return fact.id  # type: ignore[attr-defined]


class AppliedSample(Generic[F]):
    """The facts an evaluation re-scores: a uniform reservoir over every live applied fact
    (retention of old edits) plus all facts of the newest version (did the last batch take?).

    A uniform sample alone would hold only a few facts of a fresh batch among thousands, so a
    batch that failed to apply would barely move the score; the newest version is added whole
    (capped at `size`). After a rollback the facts of undone versions leave the reservoir; the
    remaining ones are still a uniform sample of the live facts, only fewer, and new versions
    refill it (slightly over-weighting them until it is full again).

    Not thread-safe: the evaluator guards it with its own lock.
    """

    def __init__(self, size: int, *, seed: int = 0, key: Callable[[F], Hashable] = _fact_id):
        if size < 1:
            raise ValueError("sample size must be at least 1")
        self.size = size
        self._key = key
        self._rng = random.Random(seed)
        self._reservoir: list[tuple[int, F]] = []
        self._counts: dict[int, int] = {}  # version -> facts applied in it, for `seen`
        self._newest: tuple[int, list[F]] | None = None

    @property
    def seen(self) -> int:
        return sum(self._counts.values())

    def add(self, version: int, facts: Sequence[F]) -> None:
        seen = self.seen
        for fact in facts:
            seen += 1
            if len(self._reservoir) < self.size:
                self._reservoir.append((version, fact))
            else:
                slot = self._rng.randrange(seen)
                if slot < self.size:
                    self._reservoir[slot] = (version, fact)
        self._counts[version] = self._counts.get(version, 0) + len(facts)
        self._newest = (version, list(facts[: self.size]))

    def drop_after(self, version: int) -> None:
        """Forget the facts of versions newer than `version` (they were rolled back)."""
        self._reservoir = [(v, f) for v, f in self._reservoir if v <= version]
        self._counts = {v: n for v, n in self._counts.items() if v <= version}
        if self._newest is not None and self._newest[0] > version:
            self._newest = None

    def sample(self) -> list[F]:
        out: list[F] = []
        keys: set[Hashable] = set()
        newest = self._newest[1] if self._newest is not None else []
        for fact in [*newest, *(f for _, f in self._reservoir)]:
            k = self._key(fact)
            if k not in keys:
                keys.add(k)
                out.append(fact)
        return out

    def __len__(self) -> int:
        return len(self.sample())


class Evaluator(Generic[F]):
    """Scores the served model on a schedule, exports the scores, and rolls back on failure.

    Use as a context manager (`with Evaluator(...) as ev:`) or call `start()`/`stop()`.
    The first run is immediate. If no `baseline` is given, the first measurement of version 0
    becomes the baseline (drift is reported once one exists); persist `evaluator.baseline`
    to keep drift across restarts that begin past version 0.
    """

    def __init__(
        self,
        *,
        score: ScoreFn[F],
        rollback: RollbackFn,
        policy: Policy,
        metrics: Metrics,
        probe_facts: Sequence[F],
        sample_size: int,
        interval_seconds: float,
        after_each_version: bool = True,
        baseline: Baseline | None = None,
        seed: int = 0,
        history_size: int = 256,
        clock: Callable[[], float] = time.time,
        on_evaluation: Callable[[Evaluation], object] | None = None,
        served_version: Callable[[], int] | None = None,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self._score = score
        self._rollback = rollback
        self.policy = policy
        self._metrics = metrics
        self._probe = list(probe_facts)
        self._sample = AppliedSample[F](sample_size, seed=seed)
        self.interval_seconds = interval_seconds
        self.after_each_version = after_each_version
        self._baseline = baseline
        self._clock = clock
        self._on_evaluation = on_evaluation
        self._served_version = served_version

        # `_state` guards the fields below it; `_run` serialises evaluations (scheduled,
        # triggered and synchronous) without holding `_state` while the model is scored.
        self._state = threading.RLock()
        self._history: deque[Evaluation] = deque(
            maxlen=max(history_size, policy.failures_before_rollback)
        )
        self._verdicts: dict[int, bool] = {}
        self._epoch = 0  # bumped by every rollback: measurements begun before it are stale
        self._requested = False
        self._job_running = False
        self._last_rollback: dict[str, Any] | None = None
        # Bumped by every change to the sample or the version (`record_version`,
        # `rolled_back`); `_scored` is (version, changes) of the last evaluation kept, the
        # changes counted when it read its sample.
        self._changes = 0
        self._scored: tuple[int, int] | None = None
        self._skipped = 0
        self._run = threading.Lock()

        self._scheduler: BackgroundScheduler | None = None
        self._job: Job | None = None
        self._export_thresholds()
        metrics.evaluation_interval_seconds.set(interval_seconds)

    @classmethod
    def from_settings(
        cls,
        settings: EvalSettings,
        *,
        score: ScoreFn[F],
        rollback: RollbackFn,
        metrics: Metrics,
        probe_facts: Sequence[F],
        baseline: Baseline | None = None,
        on_evaluation: Callable[[Evaluation], object] | None = None,
        served_version: Callable[[], int] | None = None,
    ) -> Evaluator[F]:
        return cls(
            score=score,
            rollback=rollback,
            policy=Policy.from_settings(settings),
            metrics=metrics,
            probe_facts=probe_facts,
            sample_size=settings.sample_size,
            interval_seconds=settings.interval_seconds,
            after_each_version=settings.after_each_version,
            baseline=baseline,
            on_evaluation=on_evaluation,
            served_version=served_version,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError("evaluator already started")
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone=UTC,
        )
        self._job = scheduler.add_job(
            self._scheduled,
            "interval",
            seconds=self.interval_seconds,
            id=JOB_ID,
            name="evaluate the served model",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        scheduler.start()
        self._scheduler = scheduler

    def stop(self, wait: bool = True) -> None:
        """Stop scheduling; with `wait`, let a running evaluation finish first."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None
            self._job = None

    def __enter__(self) -> Evaluator[F]:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inputs from the daemon ------------------------------------------------------------

    def record_version(
        self, version: int, facts: Sequence[F], *, evaluate: bool | None = None
    ) -> None:
        """A version is durable and served: its facts join the sample.

        Evaluates soon after when `evaluate` (default: `after_each_version`). On recovery, call
        it for every live version with `evaluate=False` to refill the sample.
        """
        with self._state:
            self._sample.add(version, facts)
            self._changes += 1
        if self.after_each_version if evaluate is None else evaluate:
            self.trigger()

    def rolled_back(self, to_version: int) -> None:
        """The model was restored to `to_version`, by the policy or an operator.

        Idempotent. Forgets evaluations and sampled facts of the undone versions (newer than
        `to_version`), so they neither count toward a failing streak nor get re-scored.
        """
        with self._state:
            self._epoch += 1
            self._changes += 1
            self._history = deque(
                (e for e in self._history if e.version <= to_version), maxlen=self._history.maxlen
            )
            # The failing streak that led here must not trigger a second rollback of the
            # restored version: keep only evaluations that passed.
            while self._history and not self._history[-1].passed:
                self._history.pop()
            self._verdicts = {v: ok for v, ok in self._verdicts.items() if v <= to_version}
            self._sample.drop_after(to_version)

    def trigger(self) -> None:
        """Ask for an evaluation as soon as possible; returns at once.

        A request that arrives while an evaluation runs is not lost: the job runs again when
        the current one ends, since that one may have read an older version.
        """
        with self._state:
            self._requested = True
            if self._job_running or self._job is None:
                return
            job = self._job
        job.modify(next_run_time=datetime.now(UTC))

    # -- outputs ---------------------------------------------------------------------------

    @property
    def baseline(self) -> Baseline | None:
        with self._state:
            return self._baseline

    @property
    def last(self) -> Evaluation | None:
        with self._state:
            return self._history[-1] if self._history else None

    @property
    def history(self) -> list[Evaluation]:
        with self._state:
            return list(self._history)

    @property
    def sample_size(self) -> int:
        with self._state:
            return len(self._sample)

    def status(self) -> dict[str, Any]:
        """JSON-ready state for `editd status` and `editd eval`: the last evaluation, the
        policy's minimums, the baseline, and the last automatic rollback."""
        with self._state:
            last = self._history[-1] if self._history else None
            baseline = self._baseline
            base_canary = baseline.canary if baseline is not None else None
            return {
                "last_evaluation": last.as_dict() if last is not None else None,
                "thresholds": {
                    "applied": self.policy.applied.as_dict(),
                    "probe": self.policy.probe.as_dict(),
                    "canary": self.policy.canary_minimum(base_canary),
                    "failures_before_rollback": self.policy.failures_before_rollback,
                },
                "baseline": (
                    {"probe": scores_dict(baseline.probe), "canary": baseline.canary}
                    if baseline is not None
                    else None
                ),
                "last_rollback": dict(self._last_rollback) if self._last_rollback else None,
                "interval_seconds": self.interval_seconds,
                "sample_size": len(self._sample),
                # Scheduled runs that found nothing to score since this process started.
                "skipped": self._skipped,
            }

    # -- the evaluation --------------------------------------------------------------------

    def evaluate(self) -> Evaluation:
        """Score the served model now, export the result, and act on the policy's decision.

        Blocks while another evaluation runs. Raises what the score callable raises (counted as
        outcome "error"); the scheduled job logs it instead.
        """
        with self._run:
            return self._evaluate()

    def _evaluate(self) -> Evaluation:
        with self._state:
            epoch = self._epoch
            changes = self._changes
            sample = self._sample.sample()
        started = time.perf_counter()
        try:
            measurement = self._score(sample, self._probe)
        except Exception:
            self._metrics.evaluations.labels(outcome="error").inc()
            raise
        seconds = time.perf_counter() - started

        with self._state:
            if self._baseline is None and measurement.version == 0:
                self._baseline = Baseline(probe=measurement.probe, canary=measurement.canary)
                self._export_thresholds()
            baseline = self._baseline
            evaluation = Evaluation(
                measurement=measurement,
                failures=check(measurement, self.policy, baseline),
                finished_at=self._clock(),
                seconds=seconds,
            )
            if epoch != self._epoch:
                # A rollback landed while we scored: the version read may be undone.
                log.info(
                    "evaluation of version %d discarded: rolled back meanwhile",
                    evaluation.version,
                )
                return evaluation
            self._export(evaluation, baseline)
            self._scored = (evaluation.version, changes)
            self._history.append(evaluation)
            self._verdicts[evaluation.version] = evaluation.passed
            decision = should_roll_back(list(self._history), self.policy, self._verdicts)

        self._log(evaluation, decision)
        if self._on_evaluation is not None:
            try:
                self._on_evaluation(evaluation)
            except Exception:
                log.exception("recording the evaluation of version %d failed", evaluation.version)
        if decision.roll_back:
            self._act(decision)
        return evaluation

    def _act(self, decision: Decision) -> None:
        assert decision.target is not None
        try:
            self._rollback(decision.target, decision.detail)
        except Exception:
            # The streak stays, so the next evaluation decides again.
            log.exception("automatic rollback to version %d failed", decision.target)
            return
        self._metrics.rollbacks.labels(reason=decision.reason).inc()
        with self._state:
            self._last_rollback = {
                "at": self._clock(),
                "from_version": decision.version,
                "to_version": decision.target,
                "reason": decision.reason,
                "detail": decision.detail,
            }
        self.rolled_back(decision.target)
        # Re-score the restored version so the gauges stop showing the undone one.
        self.trigger()

    def scheduled(self, *, force: bool = False) -> Evaluation | None:
        """One scheduled run: score unless nothing can have changed since the last evaluation
        (see the module's docstring), or `force`. Returns None when skipped."""
        with self._run:
            if not force and self._unchanged():
                self._metrics.evaluations.labels(outcome="skipped").inc()
                # The scores exported are still those of the served version, so they are
                # current as of now: the staleness alert reads this.
                self._metrics.last_evaluation_timestamp_seconds.set(self._clock())
                with self._state:
                    self._skipped += 1
                log.debug("scheduled evaluation skipped: nothing changed since the last one")
                return None
            return self._evaluate()

    def _unchanged(self) -> bool:
        with self._state:
            if self._scored is None or not self._history or not self._history[-1].passed:
                return False
            version, changes = self._scored
            if changes != self._changes:
                return False
        if self._served_version is None:
            return True
        try:
            return self._served_version() == version
        except Exception:
            log.exception("reading the served version failed; evaluating")
            return False

    def _scheduled(self) -> None:
        with self._state:
            self._job_running = True
        try:
            while True:
                with self._state:
                    forced = self._requested
                    self._requested = False
                try:
                    self.scheduled(force=forced)
                except Exception:
                    log.exception("evaluation failed")
                with self._state:
                    if not self._requested:
                        return
        finally:
            with self._state:
                self._job_running = False

    # -- export ----------------------------------------------------------------------------

    def _export_thresholds(self) -> None:
        base_canary = self._baseline.canary if self._baseline is not None else None
        self._metrics.set_thresholds(
            {"applied": self.policy.applied.as_dict(), "probe": self.policy.probe.as_dict()},
            canary=self.policy.canary_minimum(base_canary),
            norm_ratio=self.policy.max_norm_ratio,
        )

    def _export(self, evaluation: Evaluation, baseline: Baseline | None) -> None:
        m, metrics = evaluation.measurement, self._metrics
        # The base model never learnt the applied facts, so their drift is not defined. With no
        # applied facts (after a rollback to the base model) the gauges go NaN, not stale, so
        # alerts on the undone version's scores clear.
        metrics.set_scores("applied", m.applied if m.applied is not None else _NO_SCORES)
        metrics.set_scores("probe", m.probe, baseline.probe if baseline is not None else None)
        if m.canary is not None:
            metrics.set_canary(m.canary, baseline.canary if baseline is not None else None)
        metrics.gate_canary_fire_ratio.set(m.gate_fires if m.gate_fires is not None else 0.0)
        metrics.evaluated_version.set(m.version)
        metrics.evaluation_seconds.observe(evaluation.seconds)
        metrics.last_evaluation_timestamp_seconds.set(evaluation.finished_at)
        metrics.evaluations.labels(outcome="passed" if evaluation.passed else "failed").inc()

    def _log(self, evaluation: Evaluation, decision: Decision) -> None:
        m = evaluation.measurement
        applied = _fmt(m.applied) if m.applied is not None else "-"
        level = logging.INFO if evaluation.passed else logging.WARNING
        log.log(
            level,
            "evaluated version %d in %.2fs: applied[%s] probe[%s] canary=%s -> %s",
            m.version,
            evaluation.seconds,
            applied,
            _fmt(m.probe),
            "-" if m.canary is None else f"{m.canary:.3f}",
            decision.detail,
        )


@dataclass(frozen=True)
class _Undefined:
    es: float = math.nan
    ps: float = math.nan
    ns: float = math.nan
    s: float = math.nan


_NO_SCORES = _Undefined()


def _fmt(scores: object) -> str:
    return " ".join(f"{n}={getattr(scores, n):.3f}" for n in SCORE_NAMES)
