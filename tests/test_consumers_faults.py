"""Real producers, real faults: what other clients put on the fact topic never stops the consumer.

Records come from librdkafka (confluent-kafka, what most non-Python producers are) with every
compression codec Kafka defines, and as raw record batches that decode to nothing; the consumer
reads them against the embedded broker, applies what is a fact, dead-letters the rest with its
reason, and commits past all of it.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

import pytest

from editd.config import FactLimits, KafkaSettings
from editd.consumers.broker import EmbeddedBroker, ensure_topics
from editd.consumers.consumer import FactConsumer
from editd.consumers.security import KafkaSecurityError, check_connection
from editd.world.requests import make_requests
from tests.kafka_support import committed, read_topic
from tests.raw_batches import produce_batch, record_batch
from tests.test_consumers_kafka import Recorder, Running, kafka_settings

confluent_kafka = pytest.importorskip("confluent_kafka")

pytestmark = [pytest.mark.broker]

CODECS = ("gzip", "snappy", "lz4", "zstd")


@pytest.fixture
def topic(broker: EmbeddedBroker) -> str:
    name = f"faults-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap_servers, [name, f"{name}.dlq"], replication_factor=1)
    return name


def produce(servers: list[str], topic: str, codec: str, records: list[tuple[bytes, Any]]) -> None:
    """Publish (value, headers) pairs with librdkafka, compressed with `codec`, in one batch."""
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": ",".join(servers), "compression.type": codec, "linger.ms": 100}
    )
    for value, headers in records:
        producer.produce(topic, value=value, headers=headers)
    assert producer.flush(30) == 0, f"{codec}: records left unsent"


def test_every_codec_is_read_and_undecodable_records_are_dead_lettered(
    broker: EmbeddedBroker, topic: str
) -> None:
    servers = broker.bootstrap_servers
    facts = make_requests(4 * len(CODECS), seed=5)
    trace = [("source", b"crm-sync"), ("trace-id", b"t-42")]
    offsets: dict[str, int] = {}
    for i, codec in enumerate(CODECS):
        chunk = facts[4 * i : 4 * i + 4]
        produce(servers, topic, codec, [(f.model_dump_json().encode(), trace) for f in chunk])
    # A batch that fetches but cannot be decoded: its gzip payload garbled, its CRC right.
    garbled = [f.model_dump_json().encode() for f in make_requests(3, seed=99)]
    sent = record_batch(garbled, garble_payload=True)
    offsets["garbled"] = produce_batch(servers, topic, sent)
    # A record that decodes but is no fact, with the producer's own headers.
    produce(servers, topic, "lz4", [(b"{not json", trace)])
    # Facts after both: the consumer must get past them.
    tail = make_requests(3, seed=7)
    produce(servers, topic, "zstd", [(f.model_dump_json().encode(), None) for f in tail])

    recorder = Recorder()
    consumer = FactConsumer(
        kafka_settings(topic, batch_size=4), FactLimits(), recorder, bootstrap_servers=servers
    )
    want = {f.fact_id for f in [*facts, *tail]}
    with Running(consumer) as running:
        running.wait_for(lambda: set(recorder.ids) == want and consumer.stats.dead_lettered == 2)
        running.wait_for(lambda: consumer.lag() == 0)
    assert sorted(recorder.ids) == sorted(want)  # each once
    assert consumer.stats.undecodable_batches == 1

    letters = read_topic(servers, f"{topic}.dlq", expect=2, settle_ms=500)
    assert len(letters) == 2
    by_kind = {dict(r.headers).get("value_format", b"record"): r for r in letters}
    batch_letter = by_kind[b"kafka-record-batch"]
    headers = dict(batch_letter.headers)
    assert headers["error"].startswith(b"undecodable record batch at offsets ")
    assert b"Error" in headers["error"]  # the codec's own words follow
    assert headers["original_topic"] == topic.encode()
    first, last = int(headers["original_offset"]), int(headers["original_last_offset"])
    assert first <= offsets["garbled"] and last == offsets["garbled"] + len(garbled) - 1
    # The value is the batch as fetched: what the producer wrote from its CRC on (the broker
    # assigns the offset and leader epoch in front of it), for a post-mortem.
    raw = batch_letter.value
    assert raw is not None and raw[16] == 2 and raw[17:] == sent[17:]

    json_letter = by_kind[b"record"]
    assert json_letter.value == b"{not json"
    names = [k for k, _ in json_letter.headers]
    # The producer's headers, then editd's reason beside them.
    assert names[:2] == ["source", "trace-id"] and "error" in names
    assert dict(json_letter.headers)["trace-id"] == b"t-42"

    # Everything was read past and committed: a restart starts after the last fact.
    high = max(o.offset for b in recorder.batches for o in b.origins) + 1
    deadline = time.monotonic() + 20
    while committed(servers, f"group-{topic}", topic) != high and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed(servers, f"group-{topic}", topic) == high


def test_a_record_that_is_not_json_keeps_its_headers_even_when_some_are_null(
    broker: EmbeddedBroker, topic: str
) -> None:
    servers = broker.bootstrap_servers
    produce(servers, topic, "snappy", [(json.dumps([1, 2]).encode(), [("empty", None)])])
    consumer = FactConsumer(
        kafka_settings(topic), FactLimits(), Recorder(), bootstrap_servers=servers
    )
    with Running(consumer) as running:
        running.wait_for(lambda: consumer.stats.dead_lettered == 1)
    [letter] = read_topic(servers, f"{topic}.dlq", expect=1)
    assert letter.headers[0][0] == "empty"
    assert dict(letter.headers)["original_offset"] == b"0"


def test_a_port_that_accepts_but_speaks_no_kafka_is_named_within_the_timeout() -> None:
    with socket.socket() as silent:  # listens, and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        kafka = KafkaSettings(bootstrap_servers=[server], connect_timeout_ms=1500)
        started = time.monotonic()
        with pytest.raises(KafkaSecurityError, match=r"kafka\.bootstrap_servers: .* no Kafka"):
            check_connection([server], kafka)
        # TCP is at once; Kafka's handshake gets the timeout (and kafka-python's own poll step).
        assert time.monotonic() - started < 2 * 1.5 + 2
