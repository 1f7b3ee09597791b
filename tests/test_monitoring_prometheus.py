"""A real Prometheus scrapes a real `Metrics` registry: every dashboard query and every alert
expression must return data, the rules must evaluate cleanly, and the alerts must fire.

The target is prometheus_client's own HTTP server, not the daemon; the daemon's end-to-end
test reuses `prometheus_harness` against a running editd.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_harness import (
    RULES,
    Prometheus,
    Query,
    alert_queries,
    check_expressions,
    dashboard_queries,
    prometheus_binary,
)

from editd.monitoring.metrics import STAGES, Metrics

pytestmark = pytest.mark.skipif(
    prometheus_binary() is None,
    reason="prometheus not installed: apt-get install prometheus (CI installs it)",
)


@dataclass(frozen=True)
class S:
    es: float
    ps: float
    ns: float
    s: float


def populate(m: Metrics) -> None:
    """Sample values for every metric, as a daemon has them after a few versions."""
    m.facts_consumed.inc(520)
    m.facts_dead_lettered.inc(20)
    m.facts_applied.inc(500)
    m.facts_rejected.inc(32)
    m.consumer_lag.set(12)
    m.model_version.set(16)
    for seconds in (3.2, 4.1, 2.7):
        m.batch_edit_seconds.observe(seconds)
    for stage in STAGES:
        m.edit_stage_seconds.labels(stage=stage).observe(0.4)
    m.swap_pause_seconds.observe(0.0008)
    m.set_thresholds(
        {"applied": {"es": 0.8, "ps": 0.5, "ns": 0.7}, "probe": {"ns": 0.8}}, 0.88, norm_ratio=0.4
    )
    m.update_norm_ratio.labels(module="model.layers.4.mlp.down_proj").set(0.3)
    m.set_scores("applied", S(0.97, 0.9, 0.85, 0.9))
    # Probe NS below its minimum: EditdScoreBelowThreshold must go pending.
    m.set_scores("probe", S(0.02, 0.03, 0.75, 0.04), base=S(0.0, 0.0, 0.96, 0.0))
    m.set_canary(0.95, base=0.98)
    m.evaluated_version.set(16)
    m.evaluation_interval_seconds.set(60)
    m.last_evaluation_timestamp_seconds.set(time.time())
    m.evaluation_seconds.observe(1.5)
    m.evaluations.labels(outcome="passed").inc(5)
    m.observe_request("/v1/completions", 200, 0.08)
    m.observe_request("/v1/completions", 400, 0.002)
    m.prompt_tokens.inc(1200)
    m.generated_tokens.inc(300)


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    metrics = Metrics(CollectorRegistry())
    populate(metrics)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield metrics, f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_every_dashboard_query_and_alert_returns_data(served: tuple[Metrics, str]) -> None:
    metrics, target = served
    started = time.monotonic()
    with Prometheus(target, rule_files=[RULES]) as prom:
        prom.wait_for_scrapes(3)
        # Rates, increases and the rollback annotation need a change between scrapes.
        metrics.facts_applied.inc(64)
        metrics.model_version.set(17)
        metrics.rollbacks.labels(reason="probe_ns").inc()
        metrics.facts_rejected.inc(64)
        prom.wait_for('editd_rollbacks_total{reason="probe_ns"} == 1')
        prom.wait_for_scrapes(5)

        report = check_expressions(prom, dashboard_queries() + alert_queries())
        assert report.ok, f"{report}\n{prom.log_tail()}"
        assert report.checked == len(dashboard_queries()) + len(alert_queries())

        # The harness does report what is missing.
        missing = check_expressions(
            prom,
            [
                Query("panel 'x' A", "rate(editd_nonexistent_total[$__rate_interval])", False),
                Query("alert Y", "editd_also_missing > 0 and editd_consumer_lag > 0", True),
                Query("panel 'bad' A", "rate(editd_consumer_lag[", False),
            ],
        )
        assert len(missing.no_data) == 2 and len(missing.errors) == 1
        assert "editd_also_missing" in missing.no_data[1]

        # The shipped rules load and evaluate in the real server, and fire on real data.
        health = prom.rule_health()
        assert set(health) == {q.where.removeprefix("alert ") for q in alert_queries()}
        assert all(v == "" for v in health.values()), health
        rolled = prom.wait_for('ALERTS{alertname="EditdRolledBack", alertstate="firing"}')
        assert rolled[0]["metric"]["reason"] == "probe_ns"
        below = prom.wait_for('ALERTS{alertname="EditdScoreBelowThreshold"}')
        assert {(r["metric"]["set"], r["metric"]["score"]) for r in below} == {("probe", "ns")}
        assert below[0]["metric"]["alertstate"] == "pending"  # `for: 2m` not yet elapsed
        quiet = prom.query('ALERTS{alertname=~"EditdDown|EditdEvaluationStale"}')
        assert quiet == []
    assert time.monotonic() - started < 60
