"""The embedded broker's default disk storage (Tansu's S3 engine on SeaweedFS): every
acknowledged record and every committed offset survives a kill -9 of the broker (restarted by
the supervisor), of its storage, and of both (started again on the same data)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from editd.consumers.broker import BrokerError, EmbeddedBroker, weed_binary
from editd.consumers.publish import publish_raw
from tests.kafka_support import read_topic

pytestmark = pytest.mark.broker

TOPIC, GROUP = "facts", "durable-test"


@pytest.fixture(scope="module", autouse=True)
def _weed() -> None:
    try:
        weed_binary()
    except BrokerError as exc:
        pytest.skip(str(exc))


def _publish(servers: list[str], first: int, n: int) -> None:
    publish_raw([(None, f'{{"n": {i}}}'.encode()) for i in range(first, first + n)], servers, TOPIC)


def _committed(servers: list[str]) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=GROUP, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(TOPIC, 0))
    finally:
        consumer.close()


def _commit(servers: list[str], offset: int) -> None:
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=GROUP, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(TOPIC, 0): OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def _values(servers: list[str], expect: int) -> list[int]:
    import json

    records = read_topic(servers, TOPIC, expect, timeout=60)
    return [json.loads(r.value)["n"] for r in records]


def _wait_restarted(broker: EmbeddedBroker, restarts: int) -> None:
    deadline = time.monotonic() + 30
    while broker.restarts < restarts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.restarts >= restarts


def test_records_and_offsets_survive_kill_9_of_broker_storage_and_both(tmp_path: Path) -> None:
    data = tmp_path / "broker"
    broker = EmbeddedBroker(topics=[TOPIC], storage_dir=data).start().supervise()
    servers = broker.bootstrap_servers
    try:
        _publish(servers, 0, 300)
        _commit(servers, 120)
        # The broker dies; the supervisor restarts it on the same data.
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGKILL)
        _wait_restarted(broker, 1)
        assert _values(servers, 300) == list(range(300))
        assert _committed(servers) == 120
        _publish(servers, 300, 20)
        _commit(servers, 150)
        # Both die at once (as with a power cut, minus the cut): a new start on the same data.
        assert broker.store is not None
        pids = [broker.process.pid, broker.store.pid]
    finally:
        broker._stopping.set()  # the supervisor must not restart them behind the test
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    broker.stop()
    with EmbeddedBroker(port=broker.port, topics=[TOPIC], storage_dir=data) as again:
        assert _values(again.bootstrap_servers, 320) == list(range(320))
        assert _committed(again.bootstrap_servers) == 150


class _LosesOnePortRace(EmbeddedBroker):
    """A store whose first start loses the race for its Lance port, as weed did once in CI: the
    port was free when drawn and when weed checked it, and taken when weed listened. The loss
    is replayed with weed's own fatal line; every later start runs the real store."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lost: int | None = None

    def _spawn_store(self) -> None:
        if self.lost is not None:
            super()._spawn_store()
            return
        self.lost = port = self._store_ports["s3.port.lance"]
        line = (
            f"F1206 10:56:30.991405 s3.go:633 Lance Namespace listener on 127.0.0.1:{port} "
            f"error: listen tcp 127.0.0.1:{port}: bind: address already in use"
        )
        self.store = subprocess.Popen(
            ["sh", "-c", f"echo '{line}'; exit 255"], stdout=self._log, stderr=subprocess.STDOUT
        )


def test_storage_that_loses_a_port_race_starts_on_another_port(tmp_path: Path) -> None:
    broker = _LosesOnePortRace(storage_dir=tmp_path / "broker", topics=[TOPIC])
    try:
        broker.start()
        assert broker.lost is not None
        assert broker._store_ports["s3.port.lance"] != broker.lost
        _publish(broker.bootstrap_servers, 0, 3)
        assert _values(broker.bootstrap_servers, 3) == [0, 1, 2]
    finally:
        broker.stop()
