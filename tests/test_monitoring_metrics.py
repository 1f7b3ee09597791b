"""The metrics module: names, units, labels, helpers, and exposition of a real registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from editd.monitoring.metrics import SCORES, SETS, STAGES, Metrics, status_class


@dataclass(frozen=True)
class S:
    es: float
    ps: float
    ns: float
    s: float


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.facts_applied.inc(3)
    assert a.registry.get_sample_value("editd_facts_applied_total") == 3
    assert b.registry.get_sample_value("editd_facts_applied_total") == 0


def test_counters_and_gauges(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.facts_consumed.inc(10)
    metrics.facts_dead_lettered.inc(2)
    metrics.facts_applied.inc(8)
    metrics.facts_rejected.inc(4)
    metrics.facts_folded.inc(3)
    metrics.broker_errors.inc(6)
    metrics.model_version.set(7)
    metrics.consumer_lag.set(120)
    metrics.rollbacks.labels(reason="applied_es").inc()
    metrics.prompt_tokens.inc(11)
    metrics.generated_tokens.inc(5)
    assert get("editd_facts_consumed_total") == 10
    assert get("editd_facts_dead_lettered_total") == 2
    assert get("editd_facts_applied_total") == 8
    assert get("editd_facts_rejected_total") == 4
    assert get("editd_facts_folded_total") == 3
    assert get("editd_broker_errors_total") == 6
    assert get("editd_model_version") == 7
    assert get("editd_consumer_lag") == 120
    assert get("editd_rollbacks_total", {"reason": "applied_es"}) == 1
    assert get("editd_rollbacks_total", {"reason": "operator"}) == 0  # present before any
    assert get("editd_prompt_tokens_total") == 11
    assert get("editd_generated_tokens_total") == 5


def test_histograms(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.batch_edit_seconds.observe(0.05)
    metrics.batch_edit_seconds.observe(1500)
    assert get("editd_batch_edit_seconds_bucket", {"le": "0.1"}) == 1
    assert get("editd_batch_edit_seconds_bucket", {"le": "1800.0"}) == 2
    assert get("editd_batch_edit_seconds_count") == 2
    metrics.swap_pause_seconds.observe(2e-4)
    assert get("editd_swap_pause_seconds_bucket", {"le": "0.0005"}) == 1
    assert get("editd_swap_pause_seconds_bucket", {"le": "0.0001"}) == 0


def test_stage_series_exist_before_first_edit(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    for stage in STAGES:
        assert get("editd_edit_stage_seconds_count", {"stage": stage}) == 0
    metrics.edit_stage_seconds.labels(stage="solve").observe(0.2)
    assert get("editd_edit_stage_seconds_count", {"stage": "solve"}) == 1
    assert get("editd_edit_stage_seconds_sum", {"stage": "solve"}) == pytest.approx(0.2)


def test_scores_drift_thresholds_canary(metrics: Metrics) -> None:
    get = metrics.registry.get_sample_value
    metrics.set_scores("applied", S(0.9, 0.8, 0.7, 0.79))
    metrics.set_scores("probe", S(0.1, 0.2, 0.85, 0.2), base=S(0.1, 0.1, 0.95, 0.15))
    assert get("editd_score", {"set": "applied", "score": "es"}) == 0.9
    assert get("editd_score", {"set": "probe", "score": "ns"}) == 0.85
    assert get("editd_score_drift", {"set": "probe", "score": "ns"}) == pytest.approx(-0.1)
    assert get("editd_score_drift", {"set": "applied", "score": "es"}) is None
    with pytest.raises(ValueError, match="unknown score set"):
        metrics.set_scores("holdout", S(0, 0, 0, 0))

    metrics.set_thresholds({"applied": {"es": 0.8}, "probe": {"ns": 0.8}}, canary=0.88)
    assert get("editd_score_threshold", {"set": "applied", "score": "es"}) == 0.8
    assert get("editd_score_threshold", {"set": "applied", "score": "ps"}) == 0.0
    assert get("editd_canary_threshold") == 0.88
    metrics.set_canary(0.9, base=0.97)
    assert get("editd_canary") == 0.9
    assert get("editd_canary_drift") == pytest.approx(-0.07)


@pytest.mark.parametrize(
    ("code", "cls"), [(200, "2xx"), (201, "2xx"), (401, "4xx"), (503, "5xx"), (99, "1xx")]
)
def test_status_class(code: int, cls: str) -> None:
    assert status_class(code) == cls


def test_observe_request(metrics: Metrics) -> None:
    metrics.observe_request("/v1/completions", 200, 0.03)
    metrics.observe_request("/v1/completions", 422, 0.001)
    get = metrics.registry.get_sample_value
    labels = {"route": "/v1/completions", "status": "2xx"}
    assert get("editd_http_request_seconds_count", labels) == 1
    assert get("editd_http_request_seconds_count", {**labels, "status": "4xx"}) == 1


def test_exposition_follows_conventions(metrics: Metrics) -> None:
    """Parse the text the daemon serves: every family is namespaced, counters end in _total,
    and labels come only from the fixed, low-cardinality sets."""
    metrics.set_scores("applied", S(1, 1, 1, 1))
    metrics.set_scores("probe", S(0, 0, 1, 0), base=S(0, 0, 1, 0))
    metrics.rollbacks.labels(reason="operator").inc()
    metrics.observe_request("/livez", 200, 0.001)
    text = generate_latest(metrics.registry).decode()
    families = list(text_string_to_metric_families(text))
    allowed_labels = {
        "set",
        "score",
        "stage",
        "outcome",
        "reason",
        "route",
        "status",
        "le",
        "trigger",
    }
    assert len(families) >= 25
    for family in families:
        assert family.name.startswith("editd_"), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert set(sample.labels) <= allowed_labels, sample
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
            if "set" in sample.labels:
                assert sample.labels["set"] in SETS
                assert sample.labels["score"] in SCORES
