"""The update-size guard on the built-in model, through the real broker and `editd run`.

The guard's limit is the model's own (its profile), never one measured on another model: the
first batch after a fresh start moves the built-in model's layer 3 by about 12 × its norm and
realises every target, where SmolLM2's healthy batches move by at most 0.32 ×. The built-in
model's profile sets no limit (docs/guard).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from editd.consumers.broker import EmbeddedBroker, ensure_topics
from editd.consumers.publish import publish_facts
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests
from tests.kafka_support import read_topic

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_a_stream_of_good_facts_on_the_built_in_model_is_applied_whole(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    servers = broker.bootstrap_servers
    topic = f"facts-{uuid.uuid4().hex[:8]}"
    ensure_topics(servers, [topic, f"{topic}.dlq", f"{topic}.rejected"], replication_factor=1)
    # The stream of issue 25: its first batch of 50 was refused at SmolLM2's limit of 10.
    facts = make_requests(300, 5151)
    publish_facts(facts, servers, topic)
    with Daemon(tmp_path / "store", servers, topic, batch_size=50) as d:
        d.wait_ready()
        d.wait_version(6, timeout=900)
        ms = manifests(tmp_path / "store")
        assert [len(fact_ids_of(m)) for m in ms] == [50] * 6
        assert sorted(i for m in ms for i in fact_ids_of(m)) == sorted(f.fact_id for f in facts)
        assert read_topic(servers, f"{topic}.rejected", timeout=5) == []
        first = ms[0]["diagnostics"]
        ratios = [layer["update_ratio"] for layer in first["solver"].values()]
        # What SmolLM2's limit (10 then, 2 in its profile now) refused, applied and realised.
        assert max(ratios) > 10, ratios
        assert first["post_top1"] == 1.0
        assert d.terminate() == 0
