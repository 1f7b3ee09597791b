"""Serve, watch and guard, end to end on the embedded-style set-up (real broker, real daemon,
built-in model, real Prometheus).

One daemon session: facts are applied while a client keeps asking, thresholds above what a
batch can keep make the evaluator roll the new version back by itself, and a real Prometheus
scraping the daemon finds data for every dashboard panel and alert expression.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from editd.consumers.broker import EmbeddedBroker, ensure_topics
from editd.consumers.publish import publish_facts, publish_raw
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, manifests
from tests.kafka_support import read_topic
from tests.prometheus_harness import (
    RULES,
    Prometheus,
    alert_queries,
    check_expressions,
    dashboard_queries,
    prometheus_binary,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]


class Client(threading.Thread):
    """Sends completions until stopped; records latency, failures and versions seen."""

    def __init__(self, url: str, prompts: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.prompts = url, prompts
        self.stop = threading.Event()
        self.samples: list[tuple[float, float, int]] = []  # (start, seconds, version)
        self.failures: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as http:
            i = 0
            while not self.stop.is_set():
                body = {
                    "prompt": self.prompts[i % len(self.prompts)],
                    "max_tokens": 4,
                    "temperature": 0,
                }
                t = time.monotonic()
                try:
                    r = http.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        version = int(r.headers["x-editd-model-version"])
                        self.samples.append((t, time.monotonic() - t, version))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                i += 1


def percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


def test_serves_while_editing_rolls_back_a_damaging_version_and_exports_everything(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; make test does)")
    servers = broker.bootstrap_servers
    topic = f"facts-{uuid.uuid4().hex[:8]}"
    ensure_topics(servers, [topic, f"{topic}.dlq", f"{topic}.rejected"], replication_factor=1)
    good = make_requests(16, seed=31)
    env = {
        "EDITD_EVAL__AFTER_EACH_VERSION": "true",
        "EDITD_EVAL__INTERVAL_SECONDS": "5",
        "EDITD_EVAL__SAMPLE_SIZE": "16",
        "EDITD_EVAL__PROBE_SIZE": "32",
        # Thresholds above what a batch can keep: the version that applies it must go.
        "EDITD_EVAL__MIN_ES": "1.0",
        "EDITD_EVAL__MIN_PS": "1.0",
        "EDITD_EVAL__MIN_NS": "1.0",
    }
    store = tmp_path / "store"
    with Daemon(store, servers, topic, batch_size=16, linger=1.0, env=env) as d:
        d.wait_ready()
        base_sha = d.get("/v1/status").json()["served_sha256"]
        target = d.url.removeprefix("http://")
        with Prometheus(target, rule_files=[RULES]) as prom:
            client = Client(d.url, [f.rendered_prompt for f in good])
            client.start()
            time.sleep(8)  # latency without edits
            quiet_until = time.monotonic()
            publish_facts(good, servers, topic)
            publish_raw([(None, b"{not json"), (None, b'{"subject": "x"}')], servers, topic)
            d.wait_version(1, timeout=600)
            edits_until = time.monotonic()

            # The evaluator rolls the damaging version back by itself.
            d.wait_status(
                "the evaluator's rollback",
                lambda s: (s["last_rollback"] or {}).get("to") == 0,
                timeout=600,
            )
            time.sleep(3)
            client.stop.set()
            client.join(60)

            # Zero failed requests while the version was swapped in and rolled back.
            assert not client.failures, client.failures[:5]
            quiet = [s for t, s, _ in client.samples if t < quiet_until]
            busy = [s for t, s, _ in client.samples if quiet_until <= t < edits_until]
            assert len(quiet) >= 5 and len(busy) >= 5
            assert {v for *_, v in client.samples} >= {0, 1}
            q50, q99 = percentiles(quiet)
            b50, b99 = percentiles(busy)
            metrics = d.get("/metrics").text
            print(
                f"\nlatency without edits p50 {q50 * 1e3:.0f} ms p99 {q99 * 1e3:.0f} ms; "
                f"while editing p50 {b50 * 1e3:.0f} ms p99 {b99 * 1e3:.0f} ms "
                f"({len(quiet)}/{len(busy)} requests)"
            )
            print(
                *(
                    line
                    for line in metrics.splitlines()
                    if line.startswith("editd_swap_pause_seconds_")
                ),
                sep="\n",
            )

            # Version, weights, store, metrics and the rejected topic all show the rollback.
            status = d.get("/v1/status").json()
            assert status["version"] == 0
            assert status["served_sha256"] == base_sha
            v1 = next(m for m in manifests(store) if m["version"] == 1)
            assert v1["state"] == "undone"
            rejected = read_topic(servers, f"{topic}.rejected", expect=len(good), timeout=30)
            assert {dict(r.headers)["fact_id"].decode() for r in rejected} == {
                f.fact_id for f in good
            }
            assert all(dict(r.headers)["reason"] for r in rejected)
            assert "editd_model_version 0.0" in metrics
            rollbacks = [
                line for line in metrics.splitlines() if line.startswith("editd_rollbacks_total{")
            ]
            assert any(line.endswith(" 1.0") and "operator" not in line for line in rollbacks)
            assert "editd_facts_dead_lettered_total 2.0" in metrics

            # Every dashboard panel and alert expression has data in a real Prometheus.
            prom.wait_for("sum(editd_rollbacks_total) >= 1", timeout=60)
            prom.wait_for_scrapes(3)
            report = check_expressions(prom, dashboard_queries() + alert_queries())
            assert report.ok, f"{report}\n{prom.log_tail()}"
            if os.environ.get("EDITD_RENDER_DASHBOARD"):
                # How the README's picture is made: this session's panels, drawn from data.
                from scripts.render_dashboard import render

                render(prom.url, Path(os.environ["EDITD_RENDER_DASHBOARD"]), minutes=10)
        assert d.terminate() == 0
