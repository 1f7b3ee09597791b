"""The daemon end to end: real broker, real `editd run` process, built-in model.

What an operator would check: published facts change the model's answers, bad records land in
the dead-letter topic, every offset is committed, kill -9 loses and duplicates nothing, and a
rollback restores the exact weights and sends the undone facts to the rejected topic.
"""

from __future__ import annotations

import collections
import math
import random
import time
import uuid
from pathlib import Path

import pytest

from editd.consumers.broker import EmbeddedBroker, ensure_topics
from editd.consumers.publish import publish_facts, publish_raw
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests
from tests.kafka_support import committed, read_topic

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def new_topic(broker: EmbeddedBroker) -> str:
    name = f"facts-{uuid.uuid4().hex[:8]}"
    ensure_topics(
        broker.bootstrap_servers, [name, f"{name}.dlq", f"{name}.rejected"], replication_factor=1
    )
    return name


MALFORMED = [
    b"not json",
    b"{}",
    b'{"subject": "X", "prompt": "no placeholder", "target_new": "Y"}',
    b'{"subject": "X", "prompt": "{} is", "target_new": ""}',
    b'{"subject": "X", "prompt": "{} is", "target_new": "Y", "surprise": 1}',
    b"[1, 2, 3]",
    b'{"subject": "X", "prompt": "{} is {}", "target_new": "Y"}',
    b'{"subject": "X", "prompt": "{} is", "target_new": "Y", "target_true": "Y"}',
    b"\xff\xfe not utf-8",
    b'{"subject": 5, "prompt": "{} is", "target_new": "Y"}',
]


def test_stream_applies_every_fact_dead_letters_the_rest_and_rolls_back_exactly(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    servers = broker.bootstrap_servers
    topic = new_topic(broker)
    facts = make_requests(500, seed=11)
    bad = MALFORMED * 2
    records = [(f.subject.encode(), f.model_dump_json().encode()) for f in facts]
    rng = random.Random(0)
    for raw in bad:
        records.insert(rng.randrange(len(records)), (None, raw))
    batch_size = 70
    with Daemon(tmp_path / "store", servers, topic, batch_size=batch_size) as d:
        d.wait_ready()
        base_sha = d.get("/v1/status").json()["served_sha256"]
        publish_raw(records, servers, topic)
        expected_versions = math.ceil(len(facts) / batch_size)
        d.wait_version(expected_versions, timeout=900)
        time.sleep(2)  # offsets are committed right after the version is durable

        # Every valid fact applied exactly once, in ceil(500 / batch) versions.
        ms = manifests(tmp_path / "store")
        ids = [i for m in ms for i in fact_ids_of(m)]
        assert len(ms) == expected_versions
        assert sorted(ids) == sorted(f.fact_id for f in facts)
        # The 20 malformed records are in the DLQ, each with its reason and origin.
        dlq = read_topic(servers, f"{topic}.dlq", expect=len(bad), timeout=30)
        assert len(dlq) == len(bad)
        for record in dlq:
            headers = dict(record.headers)
            assert headers["error"]
            assert headers["original_topic"].decode() == topic
            assert int(headers["original_offset"]) >= 0
        # Every offset is committed: nothing will be read again.
        assert committed(servers, f"editd-{topic}", topic) == len(records)

        # The model now states the new facts.
        sample = rng.sample(facts, 20)
        right = sum(
            d.complete(f.rendered_prompt)[0].strip().startswith(f.target_new) for f in sample
        )
        # Measured at f91a73e: 13/20 greedy after 500 sequential facts (each batch top-1 for
        # 79-93 % when applied; later batches erode earlier ones). The base model gets 0: this
        # checks the edits reached the served model, the benchmark reports their quality.
        assert right >= 10, d.log()

        # Roll back 8 → 3 → 0: served tensors equal version 3's manifest, then the base.
        versions = {m["version"]: m for m in ms}
        for target in (3, 0):
            r = d.post("/v1/rollback", {"version": target, "reason": "test"}, admin=True)
            assert r.status_code == 200, r.text
            status = d.get("/v1/status").json()
            assert status["version"] == target
            want = versions[target]["sha256"] if target else base_sha
            assert status["served_sha256"] == want
        rejected = read_topic(servers, f"{topic}.rejected", expect=len(facts), timeout=30)
        assert sorted(
            r.headers and dict(r.headers)["fact_id"].decode() for r in rejected
        ) == sorted(f.fact_id for f in facts)
        assert d.terminate() == 0


def test_kill_9_at_any_moment_loses_and_duplicates_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    servers = broker.bootstrap_servers
    topic = new_topic(broker)
    facts = make_requests(48, seed=23)
    publish_facts(facts, servers, topic)
    store = tmp_path / "store"
    daemon = Daemon(store, servers, topic, batch_size=4, linger=0.5)
    rng = random.Random(5)
    # Kill points: while batching, during an edit, and just after a version became durable
    # (served, so /v1/status shows it) but possibly before its offsets were committed.
    points = [
        "ready",
        "editing",
        "version",
        "ready",
        "editing",
        "version",
        "editing",
        "version",
        "ready",
        "version",
        "editing",
        "version",
    ]
    kills = 0
    for point in points:
        daemon.start()
        try:
            daemon.wait_ready()
            if point == "ready":
                time.sleep(rng.uniform(0, 1.5))
            elif point == "editing":
                daemon.wait_status("an edit", lambda s: s["editing"] is not None, timeout=240)
                time.sleep(rng.uniform(0, 0.2))
            else:
                start = daemon.get("/v1/status").json()["version"]
                daemon.wait_status("a version", lambda s, v=start: s["version"] > v, timeout=240)
                time.sleep(rng.uniform(0, 0.2))
        except AssertionError:
            if all(len(fact_ids_of(m)) for m in manifests(store)) and _applied(store) == {
                f.fact_id for f in facts
            }:
                break  # everything is applied; nothing left to interrupt
            raise
        daemon.kill()
        kills += 1
    daemon.start()
    daemon.wait_ready()
    deadline = time.monotonic() + 600
    while _applied(store) != {f.fact_id for f in facts} and time.monotonic() < deadline:
        time.sleep(1)
    counts = collections.Counter(
        i for m in manifests(store) if m["state"] == "committed" for i in fact_ids_of(m)
    )
    assert kills >= 10
    assert set(counts) == {f.fact_id for f in facts}, daemon.log()
    assert max(counts.values()) == 1
    assert daemon.terminate() == 0


def _applied(store: Path) -> set[str]:
    return {i for m in manifests(store) if m["state"] == "committed" for i in fact_ids_of(m)}


def test_one_fact_is_served_within_seconds(broker: EmbeddedBroker, tmp_path: Path) -> None:
    servers = broker.bootstrap_servers
    topic = new_topic(broker)
    fact = make_requests(1, seed=99)[0]
    with Daemon(tmp_path / "store", servers, topic, batch_size=16, linger=1.0) as d:
        d.wait_ready()
        before, _ = d.complete(fact.rendered_prompt)
        assert not before.strip().startswith(fact.target_new)
        start = time.monotonic()
        publish_facts([fact], servers, topic)
        while time.monotonic() - start < 60:
            text, version = d.complete(fact.rendered_prompt)
            if version >= 1:
                break
            time.sleep(0.1)
        latency = time.monotonic() - start
        print(f"\npublish → served latency: {latency:.2f} s")
        assert version >= 1 and latency < 30, d.log()
        if not text.strip().startswith(fact.target_new):
            # The pipeline delivered the version in time; the edit itself did not make the new
            # object top-1 (the engine's known shortfall on the built-in model, issue 3).
            pytest.xfail(f"served version {version} answers {text!r}, not {fact.target_new!r}")
