"""The one publisher of `<topic>.rejected`: drains the edit store's outbox to Kafka.

Poison batches and rolled-back versions both land in the outbox (store/outbox.py) before they
are acknowledged; this module is the only place that turns outbox records into Kafka records.
A record leaves the outbox only after every one of its messages was acknowledged (acks=all), so
a broker outage delays rejections but loses none; a crash in between publishes some twice.

`drain` runs once (the stopped-store `editd rollback` uses it); `OutboxPublisher` is the
daemon's background thread, woken by every `Outbox.put` and retrying on a timer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from editd.store.outbox import Outbox

log = logging.getLogger(__name__)


def drain(
    outbox: Outbox,
    servers: Sequence[str],
    topic: str,
    *,
    timeout_s: float = 5.0,
    options: dict[str, Any] | None = None,
) -> int:
    """Publish every pending record to `topic`; returns how many facts were published.

    Returns 0 when no broker answered: the records stay in the outbox for the next try.
    """
    pending = outbox.pending()
    if not pending:
        return 0
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    ms = int(timeout_s * 1000)
    try:
        producer = KafkaProducer(
            bootstrap_servers=list(servers),
            acks="all",
            max_block_ms=ms,
            request_timeout_ms=ms,
            delivery_timeout_ms=3 * ms,
            bootstrap_timeout_ms=ms,
            **(options or {}),
        )
    except KafkaError as exc:
        log.warning("cannot reach a broker at %s (%s): rejected facts stay pending", servers, exc)
        return 0
    published = 0
    try:
        for record in pending:
            futures = [
                producer.send(topic, key=key, value=value, headers=headers)
                for key, value, headers in record.messages()
            ]
            producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=timeout_s)
            outbox.done(record.id)
            published += len(futures)
    except KafkaError as exc:
        log.warning(
            "publishing rejected facts to %s failed (%s); the rest stay pending", topic, exc
        )
    finally:
        producer.close(timeout=timeout_s)
    return published


class OutboxPublisher:
    """Drains the outbox in a background thread: at once after a `put`, else every `retry_s`."""

    def __init__(
        self,
        outbox: Outbox,
        servers: Sequence[str],
        topic: str,
        *,
        retry_s: float = 10.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.outbox = outbox
        self.servers = list(servers)
        self.topic = topic
        self.retry_s = retry_s
        self.options = dict(options or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> OutboxPublisher:
        self._thread = threading.Thread(target=self._run, name="editd-rejected", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.outbox.changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.outbox.changed.clear()
            try:
                drain(self.outbox, self.servers, self.topic, options=self.options)
            except Exception:
                log.exception("draining the rejected-facts outbox failed; retrying")
            if self.outbox.pending():
                self.outbox.changed.wait(self.retry_s)
            else:
                self.outbox.changed.wait()
