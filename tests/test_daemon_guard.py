"""Serve, watch and guard, end to end on the embedded-style set-up (real broker, real daemon,
built-in model, real Prometheus).

One daemon session: facts are applied while a client keeps asking, a contradicting batch makes
the evaluator roll back by itself, and a real Prometheus scraping the daemon finds data for
every dashboard panel and alert expression.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from editd.consumers.broker import EmbeddedBroker, ensure_topics
from editd.consumers.publish import publish_facts, publish_raw
from editd.facts import FactUpdate
from editd.world.requests import make_requests
from editd.world.world import load_world
from tests.daemon_harness import Daemon, manifests, read_topic
from tests.prometheus_harness import (
    RULES,
    Prometheus,
    alert_queries,
    check_expressions,
    dashboard_queries,
    prometheus_binary,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


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


def contradicting(facts: list[FactUpdate]) -> list[FactUpdate]:
    """The same (subject, prompt) moved to yet another object: undoes the earlier edits."""
    world = load_world()
    out = []
    for f in facts:
        rel = next(r for r in world.relations.values() if f.prompt in r.templates)
        other = next(o for o in rel.objects if o not in (f.target_new, f.target_true))
        out.append(f.model_copy(update={"target_new": other, "id": None}))
    return [FactUpdate(**f.model_dump(exclude={"id"})) for f in out]


def test_serves_while_editing_rolls_back_a_damaging_batch_and_exports_everything(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; make test does)")
    servers = broker.bootstrap_servers
    topic = f"facts-{uuid.uuid4().hex[:8]}"
    ensure_topics(servers, [topic, f"{topic}.dlq", f"{topic}.rejected"], replication_factor=1)
    good = make_requests(48, seed=31)
    env = {
        "EDITD_EVAL__AFTER_EACH_VERSION": "true",
        "EDITD_EVAL__INTERVAL_SECONDS": "5",
        "EDITD_EVAL__SAMPLE_SIZE": "48",
        "EDITD_EVAL__PROBE_SIZE": "32",
    }
    store = tmp_path / "store"
    with Daemon(store, servers, topic, batch_size=16, linger=1.0, env=env) as d:
        d.wait_ready()
        target = d.url.removeprefix("http://")
        with Prometheus(target, rule_files=[RULES]) as prom:
            client = Client(d.url, [f.rendered_prompt for f in good])
            client.start()
            time.sleep(8)  # latency without edits
            quiet_until = time.monotonic()
            publish_facts(good, servers, topic)
            publish_raw([(None, b"{not json"), (None, b'{"subject": "x"}')], servers, topic)
            d.wait_version(3, timeout=600)
            d.wait_log("evaluated version 3", timeout=300)
            status = d.get("/v1/status").json()
            assert status["evaluation"]["last"]["passed"], status
            edits_until = time.monotonic()
            time.sleep(3)
            client.stop.set()
            client.join(60)

            # Zero failed requests while three versions were swapped in.
            assert not client.failures, client.failures[:5]
            quiet = [s for t, s, _ in client.samples if t < quiet_until]
            busy = [s for t, s, _ in client.samples if quiet_until <= t < edits_until]
            assert len(quiet) >= 5 and len(busy) >= 5
            assert {v for *_, v in client.samples} >= {0, 3}
            q50, q99 = percentiles(quiet)
            b50, b99 = percentiles(busy)
            metrics = d.get("/metrics").text
            print(
                f"\nlatency without edits p50 {q50 * 1e3:.0f} ms p99 {q99 * 1e3:.0f} ms; "
                f"while editing p50 {b50 * 1e3:.0f} ms p99 {b99 * 1e3:.0f} ms "
                f"({len(quiet)}/{len(busy)} requests)"
            )
            print(
                next(
                    line
                    for line in metrics.splitlines()
                    if line.startswith("editd_swap_pause_seconds_sum")
                )
            )

            # The completions API answers with the new objects.
            right = sum(
                d.complete(f.rendered_prompt)[0].strip().startswith(f.target_new) for f in good[:16]
            )
            assert right >= 14

            # A batch contradicting the first one: the applied sample's ES collapses, and the
            # evaluator rolls back to the newest version that passed, by itself.
            bad = contradicting(good[:16])
            publish_facts(bad, servers, topic)
            d.wait_log("rolled back 4 → 3", timeout=600)
            status = d.get("/v1/status").json()
            assert status["version"] == 3
            v3 = next(m for m in manifests(store) if m["version"] == 3)
            assert status["served_sha256"] == v3["sha256"]
            v4 = next(m for m in manifests(store) if m["version"] == 4)
            assert v4["state"] == "undone"
            rejected = read_topic(servers, f"{topic}.rejected", expect=len(bad))
            assert {dict(r.headers)["fact_id"].decode() for r in rejected} == {
                f.fact_id for f in bad
            }
            assert all(
                b"applied_es" in dict(r.headers)["reason"] or b"es" in dict(r.headers)["reason"]
                for r in rejected
            )
            metrics = d.get("/metrics").text
            assert 'editd_rollbacks_total{reason="applied_es"} 1.0' in metrics
            assert "editd_model_version 3.0" in metrics

            # Every dashboard panel and alert expression has data in a real Prometheus.
            prom.wait_for('editd_rollbacks_total{reason="applied_es"} >= 1', timeout=60)
            prom.wait_for_scrapes(3)
            report = check_expressions(prom, dashboard_queries() + alert_queries())
            assert report.ok, f"{report}\n{prom.log_tail()}"
            if os.environ.get("EDITD_RENDER_DASHBOARD"):
                # How the README's picture is made: this session's panels, drawn from data.
                from scripts.render_dashboard import render

                render(prom.url, Path(os.environ["EDITD_RENDER_DASHBOARD"]), minutes=10)
        assert d.terminate() == 0
