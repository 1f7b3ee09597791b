"""Every Prometheus metric editd exports, in one place.

All metrics live on one `Metrics` object built against a `CollectorRegistry`, so the daemon
serves exactly its own registry on `/metrics` and each test builds a fresh one and reads it
back with `registry.get_sample_value`. Names follow the Prometheus conventions: namespace
`editd`, base units in the name (`_seconds`), counters end in `_total`, and no label ever
carries a per-fact value (ids, subjects, prompts) — label values come from small fixed sets.

The dashboard (`deploy/grafana/dashboards/editd.json`) and the alert rules
(`deploy/prometheus/rules.yml`) refer only to names defined here; a test checks it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from editd.config import SCORE_NAMES

NAMESPACE = "editd"

# Label values, fixed sets (the only values the daemon may use).
SETS = ("applied", "probe")
SCORES = SCORE_NAMES
# Stages of one batch: C0 (first batch only), keys, targets, solve, the post-edit check, the
# durable commit to the store (sha256, fsync) and the swap into the served weights.
STAGES = ("stats", "keys", "targets", "solve", "check", "store", "apply")
EVALUATION_OUTCOMES = ("passed", "failed", "error", "skipped")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# A rollback's reason: the policy check that failed first (`<set>_<score>`, `canary`), or
# `operator` for a rollback asked through the CLI or API (its free-text reason goes to logs).
ROLLBACK_REASONS = (*(f"{st}_{sc}" for st in SETS for sc in SCORES), "canary", "operator")

# One edit batch takes from a fraction of a second (a few facts on the built-in model) to tens
# of minutes (thousands of facts on an 8B model with a cold C0); buckets span 0.1 s .. 30 min.
EDIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
# Stages are shorter than whole batches (apply is a tensor add), so the range starts lower.
STAGE_BUCKETS = (0.001, 0.01, 0.05, *EDIT_BUCKETS)
# Evaluations score a few hundred prompts: seconds on the built-in model, minutes on 8B.
EVAL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# HTTP latency: a /livez probe takes microseconds, a long completion tens of seconds.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The swap holds the write lock only for the tensor copies: microseconds to tens of ms.
SWAP_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1)


class ScoreSet(Protocol):
    """What the exporter reads from a score result (`editd.editing.scoring.Scores`)."""

    @property
    def es(self) -> float: ...
    @property
    def ps(self) -> float: ...
    @property
    def ns(self) -> float: ...
    @property
    def s(self) -> float: ...


class SnapshotCounter(Collector):
    """A counter kept as a plain number by a component that knows no Prometheus (the fact
    consumer's `ConsumerStats`), read at scrape time without any application lock: `source`
    returns it, and `inc` adds to it here (tests, or a process without a consumer).

    Copying such numbers into a `Counter` by delta at scrape time was wrong twice: the copy
    ran inside the scrape, and two concurrent scrapes could both add the same delta."""

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        namespace: str = NAMESPACE,
        registry: CollectorRegistry,
    ) -> None:
        self.name = f"{namespace}_{name}"
        self.documentation = documentation
        self.source: Callable[[], float] | None = None
        self._own = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self._own += amount

    def describe(self) -> Iterator[Any]:
        yield CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Any]:
        value = self._own + (float(self.source()) if self.source is not None else 0.0)
        yield CounterMetricFamily(self.name, self.documentation, value=value)


def status_class(status_code: int) -> str:
    """`404` -> `"4xx"`: the `status` label keeps five values whatever the server answers."""
    return f"{max(1, min(5, status_code // 100))}xx"


class Metrics:
    """The daemon's metrics. Build one per process (or per test) with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Never the global default registry: two daemons in one test process must not clash.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # Ingestion (consumers/).
        self.facts_consumed = SnapshotCounter(
            "facts_consumed",
            "Fact records read from the fact topic, valid or not.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.facts_dead_lettered = SnapshotCounter(
            "facts_dead_lettered",
            "Records that failed validation and went to the dead-letter topic.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.facts_applied = Counter(
            "facts_applied",
            "Facts written into the model in a durable version.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.facts_rejected = Counter(
            "facts_rejected",
            "Facts of rolled-back versions published to the rejected topic.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.facts_folded = SnapshotCounter(
            "facts_folded",
            "Facts replaced by a later duplicate (same id, or same subject and prompt) before "
            "being applied.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.broker_errors = SnapshotCounter(
            "broker_errors",
            "Failed Kafka operations the consumer retried: connects, polls, commits, "
            "dead-letter sends, client rebuilds.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "consumer_lag",
            "Records behind the partitions' high-water marks, summed over assigned partitions.",
            namespace=NAMESPACE,
            registry=r,
        )

        # The update log (consumers/updates.py): the editor publishes, replicas follow.
        self.update_log_version = Gauge(
            "update_log_version",
            "Editor: the version the update log last said is current (published). Replica: "
            "the version the last current record it read named.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.update_log_lag = Gauge(
            "update_log_lag_records",
            "Replica: update-log records after the last one it read (0: caught up).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.update_log_takeovers = Counter(
            "update_log_takeovers",
            "Replica: times another editor took the update log over; each time the replica "
            "dropped the old editor's versions and rebuilt from the base with the new one's.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.update_log_refused = Counter(
            "update_log_refused",
            "Replica: update-log records refused (bad checksum, sha256, lineage); the replica "
            "keeps serving its last good version.",
            namespace=NAMESPACE,
            registry=r,
        )

        # Editing (editing/ via daemon/).
        self.batch_edit_seconds = Histogram(
            "batch_edit_seconds",
            "Wall time to compute and apply one batch's update (one version).",
            namespace=NAMESPACE,
            buckets=EDIT_BUCKETS,
            registry=r,
        )
        self.edit_stage_seconds = Histogram(
            "edit_stage_seconds",
            "Wall time of one stage of a batch edit.",
            ["stage"],
            namespace=NAMESPACE,
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        # The capacity monitor (editing/capacity.py): the norm growth ENCORE blames for
        # degradation, which on SmolLM2 rose with the canary's fall (docs/lifelong).
        self.update_norm_ratio = Gauge(
            "update_norm_ratio",
            "‖W − W0‖_F / ‖W0‖_F of each edited module in the served version.",
            ["module"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.update_norm_ratio_threshold = Gauge(
            "update_norm_ratio_threshold",
            "Norm growth past which EditdCapacityNearlyFull warns (eval.max_norm_ratio; 0 = off).",
            namespace=NAMESPACE,
            registry=r,
        )
        # Joint re-solves of the live facts (VersionedModel.consolidate), which return norm.
        self.consolidations = Counter(
            "consolidations",
            "Consolidations run, by trigger (schedule, operator) and outcome (applied, failed).",
            ["trigger", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.consolidate_seconds = Histogram(
            "consolidate_seconds",
            "Wall time of one consolidation (every live fact re-solved, stored, swapped in).",
            namespace=NAMESPACE,
            buckets=EDIT_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "model_version",
            "Model version being served (0 = base model).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.swap_pause_seconds = Histogram(
            "swap_pause_seconds",
            "Time requests were held back while a version's weights were swapped in.",
            namespace=NAMESPACE,
            buckets=SWAP_BUCKETS,
            registry=r,
        )

        # Evaluation and rollback (monitoring/).
        self.score = Gauge(
            "score",
            "Edit quality of the last evaluation (CounterFact ES/PS/NS and S, 0..1).",
            ["set", "score"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.score_drift = Gauge(
            "score_drift",
            "Score minus the base model's score on the same facts.",
            ["set", "score"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.score_threshold = Gauge(
            "score_threshold",
            "Minimum score the rollback policy accepts (0 = not checked).",
            ["set", "score"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.canary = Gauge(
            "canary",
            "General-ability canary of the last evaluation (held-out accuracy, 0..1).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.canary_drift = Gauge(
            "canary_drift",
            "Canary minus the base model's canary.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.canary_threshold = Gauge(
            "canary_threshold",
            "Minimum canary the rollback policy accepts (0 = not checked).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.evaluated_version = Gauge(
            "evaluated_version",
            "Model version the last evaluation scored.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.last_evaluation_timestamp_seconds = Gauge(
            "last_evaluation_timestamp_seconds",
            "Unix time the exported scores were last known to describe the served model: an "
            "evaluation finished, or a scheduled one found nothing changed since the last.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.evaluation_interval_seconds = Gauge(
            "evaluation_interval_seconds",
            "Configured time between scheduled evaluations (for the staleness alert).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.evaluation_seconds = Histogram(
            "evaluation_seconds",
            "Wall time of one evaluation.",
            namespace=NAMESPACE,
            buckets=EVAL_BUCKETS,
            registry=r,
        )
        self.evaluations = Counter(
            "evaluations",
            "Evaluations, by outcome (passed, failed the policy, error; skipped: a scheduled "
            "one with the served version and the applied-fact sample unchanged since the last "
            "evaluation, which passed).",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.rollbacks = Counter(
            "rollbacks",
            "Rollbacks performed, by reason (a failed policy check, or operator).",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )

        # Serving (daemon/ HTTP API).
        self.http_request_seconds = Histogram(
            "http_request_seconds",
            "HTTP request latency, by route template and status class.",
            ["route", "status"],
            namespace=NAMESPACE,
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens",
            "Prompt tokens read by completion requests.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.generated_tokens = Counter(
            "generated_tokens",
            "Tokens generated by completion requests.",
            namespace=NAMESPACE,
            registry=r,
        )

        # The gated memory (editing.memory: gated): how often its gates open is the new
        # capacity signal, since its writes act only where they open.
        self.gate_canary_fire_ratio = Gauge(
            "gate_canary_fire_ratio",
            "Share of the canary's tokens at which the gated memory opened a block, at the "
            "last evaluation (0 when the weight form is served).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.gate_tokens = Counter(
            "gate_tokens",
            "Tokens the gated memory's gate read (requests, evaluations and edits).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.gate_fired_tokens = Counter(
            "gate_fired_tokens",
            "Tokens at which the gated memory opened at least one block.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.gate_memory_facts = Gauge(
            "gate_memory_facts",
            "Facts the served gated memory holds (0 for the weight form).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.gate_memory_bytes = Gauge(
            "gate_memory_bytes",
            "Bytes of tensors the served gated memory holds.",
            namespace=NAMESPACE,
            registry=r,
        )

        # Labelled series appear only once touched; create the fixed ones now so dashboards and
        # alerts see a 0 instead of "no data" before the first edit or evaluation.
        for stage in STAGES:
            self.edit_stage_seconds.labels(stage=stage)
        for outcome in EVALUATION_OUTCOMES:
            self.evaluations.labels(outcome=outcome)
        # `increase()` cannot see a counter's first step if the series starts at 1, so the
        # "rollback happened" alert needs every reason present at 0 from the start.
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(reason=reason)
        for trigger in ("schedule", "operator"):
            for outcome in ("applied", "failed"):
                self.consolidations.labels(trigger=trigger, outcome=outcome)

    def read_consumer(self, stats: Any, lag: Callable[[], int | None]) -> None:
        """Export the fact consumer's own counters (plain ints in its `ConsumerStats`) and
        its lag, read at scrape time without a lock and without copying."""
        self.facts_consumed.source = lambda: stats.consumed
        self.facts_dead_lettered.source = lambda: stats.dead_lettered
        self.facts_folded.source = lambda: stats.folded
        self.broker_errors.source = lambda: stats.broker_errors
        self.consumer_lag.set_function(lambda: lag() or 0)

    def observe_request(self, route: str, status_code: int, seconds: float) -> None:
        """`route` is the route template (`/v1/completions`), never the raw URL."""
        self.http_request_seconds.labels(route=route, status=status_class(status_code)).observe(
            seconds
        )

    def set_scores(self, set_name: str, scores: ScoreSet, base: ScoreSet | None = None) -> None:
        """Export one set's scores and, when the base model's are known, their drift."""
        if set_name not in SETS:
            raise ValueError(f"unknown score set {set_name!r}; expected one of {SETS}")
        for name in SCORES:
            value = float(getattr(scores, name))
            self.score.labels(set=set_name, score=name).set(value)
            if base is not None:
                drift = value - float(getattr(base, name))
                self.score_drift.labels(set=set_name, score=name).set(drift)

    def set_canary(self, value: float, base: float | None = None) -> None:
        self.canary.set(value)
        if base is not None:
            self.canary_drift.set(value - base)

    def set_thresholds(
        self, minimums: dict[str, dict[str, float]], canary: float, norm_ratio: float = 0.0
    ) -> None:
        """Export the policy's minimums, so dashboards draw them and alerts compare to them."""
        for set_name in SETS:
            for name in SCORES:
                value = minimums.get(set_name, {}).get(name, 0.0)
                self.score_threshold.labels(set=set_name, score=name).set(value)
        self.canary_threshold.set(canary)
        self.update_norm_ratio_threshold.set(norm_ratio)
