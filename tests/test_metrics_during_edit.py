"""`/metrics` never waits for an edit: a scrape while `editd run` edits SmolLM2 answers at once
(Prometheus gives up after its scrape timeout, 10 s by default, and `EditdDown` would fire while
editd works normally), and the capacity gauges still move with the version."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from editd.consumers.publish import publish_facts
from editd.facts import FactUpdate
from tests.daemon_harness import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.broker]

FACTS = [
    FactUpdate(
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
    ),
    FactUpdate(
        subject="Toko Yasuda",
        prompt="{} plays the",
        target_new="piano",
        target_true="guitar",
    ),
]
SCRAPE_BOUND_S = 1.0
CORPUS = Path(__file__).resolve().parents[1] / "editd/monitoring/assets/canary_prompts.txt"


def _norm_ratios(text: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("editd_update_norm_ratio{")
    ]


def test_a_scrape_during_an_edit_answers_at_once(tmp_path: Path, broker, smollm2_dir: Path):
    servers = broker.bootstrap_servers
    topic = "facts-scrape"
    daemon = Daemon(
        tmp_path / "data",
        servers,
        topic,
        batch_size=len(FACTS),
        linger=0.5,
        # C0 from a little shipped text, not from text the model would generate first: this
        # test times a scrape, not the edit's quality.
        env={
            "EDITD_MODEL__PATH": str(smollm2_dir),
            "EDITD_EDITING__STATS_CORPUS": str(CORPUS),
            "EDITD_EDITING__STATS_TOKENS": "2048",
        },
    )
    with daemon:
        daemon.wait_ready(timeout=600)
        assert set(_norm_ratios(daemon.get("/metrics").text)) == {0.0}
        publish_facts(FACTS, servers, topic)
        daemon.wait_status("an edit in progress", lambda s: s["editing"] is not None, 300)
        start = time.monotonic()
        scrape = httpx.get(f"{daemon.url}/metrics", timeout=30)
        seconds = time.monotonic() - start
        editing = daemon.get("/v1/status").json()["editing"]
        assert scrape.status_code == 200
        assert seconds < SCRAPE_BOUND_S, seconds
        assert editing is not None, "the edit ended before the scrape: nothing was measured"
        print(f"scrape during an edit: {seconds:.3f}s")
        daemon.wait_status("version 1", lambda s: s["version"] == 1, timeout=600)
        # The gauges moved with the version, set by the thread that changed it: SmolLM2's
        # profile serves edits through the gated memory, whose size is what grows (its
        # weights, and so their norm ratios, stay the base's).
        metrics = daemon.get("/metrics").text
        assert set(_norm_ratios(metrics)) == {0.0}
        assert f"editd_gate_memory_facts {float(len(FACTS))}" in metrics
