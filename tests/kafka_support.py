"""Reading topics back with a plain, independent kafka-python client, for assertions."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

Servers = str | list[str]


def read_topic(
    servers: Servers,
    topic: str,
    expect: int | None = None,
    *,
    partition: int = 0,
    timeout: float = 20.0,
    settle_ms: int = 0,
    **options: Any,
) -> list[Any]:
    """Every record of one partition from the beginning.

    Waits until `expect` records arrived or `timeout` passed; with `expect` None, until three
    polls in a row return nothing. `settle_ms` adds one more poll, so that more records than
    expected show up as a failure instead of going unread.
    """
    reader = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, **options)
    tp = TopicPartition(topic, partition)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    idle = 0
    try:
        while time.monotonic() < deadline:
            if expect is not None and len(records) >= expect:
                break
            got = reader.poll(timeout_ms=200)
            idle = 0 if got else idle + 1
            if expect is None and idle >= 3:
                break
            for batch in got.values():
                records.extend(batch)
        if settle_ms:
            for batch in reader.poll(timeout_ms=settle_ms).values():
                records.extend(batch)
    finally:
        reader.close()
    return records


def committed(servers: Servers, group: str, topic: str, partition: int = 0) -> int | None:
    """The offset `group` has committed on the partition, None if it has none."""
    probe = KafkaConsumer(bootstrap_servers=servers, group_id=group, enable_auto_commit=False)
    try:
        return probe.committed(TopicPartition(topic, partition))
    finally:
        probe.close(autocommit=False)
