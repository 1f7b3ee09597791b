"""The update log: the editor's versions and rollbacks on one Kafka partition, in order.

Kafka already replicates and keeps an ordered log, so replicas follow the editor through it
rather than through a protocol of editd's own. One topic (`kafka.updates_topic`, default
`model-updates`), one partition (order is the point), unlimited retention. Two record kinds:

- `version`: a version payload (store/wire.py: the typed record and its low-rank factors),
  split into ordered chunks of at most `kafka.update_chunk_bytes`. Every chunk carries the
  version, its index, the chunk count and the sha256 of the whole payload, so a reader
  reassembles it and checks it before anything parses it. Chunks rather than a claim check on
  an object store: nothing to run beside Kafka, nothing to garbage-collect, and the bytes are
  replicated by the same log that orders them (a 100-fact version of an 8B Llama, ~50 MB of
  factors, is ~100 chunks of 512 KiB).
- `current`: which version the editor serves, after a commit or a rollback.
- `takeover`: from here on the log is this editor's (below).

Every chunk names the editor that wrote it: the id of its edit store (store/identity.py), in
an `editor` header. Two editors' versions share numbers but not weights (an editor whose disk
was lost and whose store was recreated, a second editor pointed at the same topic), so an
editor that finds the log's last record written by another store refuses to start
(`UpdateLogTaken`) unless its operator said to take the log over
(`kafka.take_over_updates_log`, `editd run --take-over-updates-log`); it then publishes a
`takeover` record before its own versions. A replica follows one editor: records of another
editor are refused until a takeover record names it, and then the replica drops the old
lineage, rebuilds from the base with the new editor's versions, and ignores the old editor's
records for good (daemon/replica.py). A running editor learns it was taken over when its next
publication lands after another editor's records (no extra read per publication; the replicas
ignore what it sent), and stops (`UpdateLogTaken` again).

The editor publishes only what its store made durable, at least once: `UpdateLogPublisher`
compares the store's current version with what it last published (`update-log.json` in the
data dir), sends the versions the log lacks, then a current record, and waits for the broker's
acknowledgements before it remembers them. A crash in between publishes some records twice;
replicas recognise a version they hold (same parent and sha256) and a current record for the
version they serve. A coalesced run (commit then rollback before the publisher ran) publishes
only the final state.

`Assembler` and `UpdateLogReader` are the replica's side: bytes in, whole checked payloads out.
Nothing here imports torch; the payloads are opaque bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from editd import durable

log = logging.getLogger(__name__)

VERSION = "version"
CURRENT = "current"
TAKEOVER = "takeover"
KINDS = (VERSION, CURRENT, TAKEOVER)
# Retention of the update log: a replica started from nothing rebuilds from it.
TOPIC_CONFIGS = {"retention.ms": "-1", "retention.bytes": "-1"}


class Source(Protocol):
    """What the publisher reads (store/wire.py's UpdateLogSource)."""

    def current(self) -> int: ...

    def lineage(self, version: int) -> list[int]: ...

    def version_payload(self, version: int) -> bytes: ...

    def current_payload(self, version: int, previous: int | None) -> bytes: ...


class UpdateLogTaken(RuntimeError):
    """The update log was written by another editor (another edit store) than this one."""


def messages(
    kind: str, version: int, payload: bytes, chunk_bytes: int, editor: str | None = None
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) of the chunks that carry `payload`, in order; `editor` is the
    id of the store that wrote them (None: an editor from before store ids)."""
    if kind not in KINDS:
        raise ValueError(f"unknown update-log record kind {kind!r}")
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    digest = hashlib.sha256(payload).hexdigest()
    parts = [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] or [b""]
    out = []
    for i, part in enumerate(parts):
        headers = [
            ("kind", kind.encode()),
            ("version", str(version).encode()),
            ("chunk", str(i).encode()),
            ("chunks", str(len(parts)).encode()),
            ("sha256", digest.encode()),
            ("bytes", str(len(payload)).encode()),
        ]
        if editor is not None:
            headers.append(("editor", editor.encode()))
        out.append((f"{kind}/{version}/{i}".encode(), part, headers))
    return out


@dataclass(frozen=True)
class LogRecord:
    """A whole, checksum-verified payload and where it lies on the log."""

    kind: str
    version: int
    payload: bytes
    first_offset: int
    next_offset: int  # the offset after its last chunk
    editor: str | None = None  # the store that wrote it; None from an editor before store ids


@dataclass(frozen=True)
class Refusal:
    """Chunks that did not make a valid record; the reader skips them and says why."""

    offset: int
    version: int | None
    why: str


@dataclass
class _Partial:
    kind: str
    version: int
    chunks: int
    sha256: str
    first_offset: int
    editor: str | None
    parts: list[bytes] = field(default_factory=list)


class Assembler:
    """Reassembles chunks into records, in log order; pure (no Kafka)."""

    def __init__(self) -> None:
        self._partial: _Partial | None = None

    def feed(
        self, offset: int, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> LogRecord | Refusal | None:
        h = {k: (v or b"").decode("utf-8", "replace") for k, v in headers}
        try:
            kind, version = h["kind"], int(h["version"])
            chunk, chunks, digest = int(h["chunk"]), int(h["chunks"]), h["sha256"]
        except (KeyError, ValueError):
            return Refusal(
                offset,
                None,
                "not an update-log record (headers kind, version, chunk, chunks, sha256 missing)",
            )
        editor = h.get("editor") or None
        if kind not in KINDS or chunks <= 0 or not 0 <= chunk < chunks:
            return Refusal(offset, version, f"bad chunk header: {kind} {chunk}/{chunks}")
        refused: Refusal | None = None
        p = self._partial
        if chunk == 0:
            if p is not None:
                refused = Refusal(
                    p.first_offset,
                    p.version,
                    f"incomplete: the log moved on after {len(p.parts)} of {p.chunks} chunks",
                )
            p = self._partial = _Partial(kind, version, chunks, digest, offset, editor)
        elif (
            p is None
            or (p.kind, p.version, p.chunks, p.sha256, p.editor)
            != (kind, version, chunks, digest, editor)
            or chunk != len(p.parts)
        ):
            self._partial = None
            return Refusal(offset, version, f"chunk {chunk} of {chunks} out of order")
        p.parts.append(value or b"")
        if len(p.parts) < p.chunks:
            return refused
        self._partial = None
        payload = b"".join(p.parts)
        if hashlib.sha256(payload).hexdigest() != p.sha256:
            return Refusal(
                p.first_offset,
                version,
                "checksum mismatch: the payload's sha256 is not the one its chunks name",
            )
        if refused is not None:
            log.warning("update log: %s", refused.why)
        return LogRecord(kind, version, payload, p.first_offset, offset + 1, p.editor)

    @property
    def pending_from(self) -> int | None:
        """The first offset of a record still being reassembled."""
        return self._partial.first_offset if self._partial else None


class UpdateLogPublisher:
    """Publishes the editor's store to the update log from a background thread."""

    def __init__(
        self,
        source: Source,
        servers: Sequence[str],
        topic: str,
        *,
        state_file: Path,
        chunk_bytes: int = 512 * 1024,
        retry_s: float = 5.0,
        options: dict[str, Any] | None = None,
        editor_id: str | None = None,
        take_over: bool = False,
        on_published: Callable[[int], None] | None = None,
        on_taken: Callable[[UpdateLogTaken], None] | None = None,
    ) -> None:
        self.source = source
        self.servers = list(servers)
        self.topic = topic
        self.state_file = Path(state_file)
        self.chunk_bytes = chunk_bytes
        self.retry_s = retry_s
        self.options = dict(options or {})
        self.editor_id = editor_id
        self.take_over = take_over
        self.on_published = on_published
        self.on_taken = on_taken
        self.published: int | None = None  # the version the log says is current
        self.bytes_published = 0
        self.error: str | None = None
        self.taken: UpdateLogTaken | None = None  # set once: this editor no longer publishes
        self.took_over_from: str | None = None  # the editor whose log this one took over
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Any = None
        self._state = self._read_state()
        self._claimed = False
        self._takeover_pending = False

    def notify(self, _version: int | None = None) -> None:
        """A version changed (cheap; called under the model's write lock)."""
        self._wake.set()

    def start(self) -> UpdateLogPublisher:
        self._thread = threading.Thread(target=self._run, name="editd-updates", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._producer is not None:
            self._producer.close(timeout=timeout)
            self._producer = None

    def claim(self, timeout_s: float = 30.0) -> None:
        """Make sure the log is this editor's before anything is published (once).

        A log whose last record another store wrote raises `UpdateLogTaken`, unless
        `take_over`: then the next publication starts with a takeover record and republishes
        the whole live lineage. A log shorter than what was published (a broker that lost its
        disk, a recreated topic) is republished from the live lineage, or fresh replicas could
        not rebuild. Raises Kafka's errors when the broker cannot say.
        """
        if self._claimed:
            return
        end, writer = self._last_writer(timeout_s)
        if end < self._state["end_offset"]:
            log.warning(
                "update log: %s ends at offset %d, before the %d published; republishing",
                self.topic,
                end,
                self._state["end_offset"],
            )
            self._state = self._empty_state()
        if self._foreign(end, writer):
            if not self.take_over:
                raise UpdateLogTaken(
                    f"the update log {self.topic} was written by another editor (store "
                    f"{writer or 'without an id'}; this one is {self.editor_id}), whose versions "
                    f"its replicas serve; to make them drop those and follow this editor, start "
                    f"it with --take-over-updates-log (kafka.take_over_updates_log), or give it "
                    f"another kafka.updates_topic"
                )
            log.warning(
                "update log: taking %s over from editor store %s; its replicas will drop that "
                "editor's versions and follow this one",
                self.topic,
                writer or "without an id",
            )
            self.took_over_from = writer or ""
            self._takeover_pending = True
            self._state = self._empty_state()
        self._claimed = True

    def publish_once(self, timeout_s: float = 30.0) -> bool:
        """Bring the log up to the store's current version; True when it is there."""
        from kafka import KafkaProducer

        target = self.source.current()
        if not self._claimed:
            self.claim(timeout_s)
        if self._state["current"] == target and not self._takeover_pending:
            self.published = target
            return True
        if self._producer is None:
            ms = int(timeout_s * 1000)
            self._producer = KafkaProducer(
                bootstrap_servers=self.servers,
                acks="all",
                max_block_ms=ms,
                request_timeout_ms=ms,
                delivery_timeout_ms=3 * ms,
                max_request_size=max(1 << 20, 2 * self.chunk_bytes),
                **self.options,
            )
        sent_versions, sent_bytes, futures = [], 0, []
        if self._takeover_pending:
            body = {
                "editor": self.editor_id,
                "previous": self.took_over_from or None,
                "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            futures += self._send(TAKEOVER, 0, json.dumps(body, sort_keys=True).encode())
        for v in self.source.lineage(target)[1:]:
            if v in self._state["versions"]:
                continue
            payload = self.source.version_payload(v)
            futures += self._send(VERSION, v, payload)
            sent_versions.append(v)
            sent_bytes += len(payload)
        payload = self.source.current_payload(target, self._state["current"])
        futures += self._send(CURRENT, target, payload)
        sent_bytes += len(payload)
        self._producer.flush(timeout=timeout_s)
        metas = [f.get(timeout=timeout_s) for f in futures]
        previous_end = self._state["end_offset"]
        if previous_end and metas[0].offset > previous_end and not self._takeover_pending:
            # Someone wrote between this editor's publications: if another editor took the
            # log over, its replicas ignore what was just sent, and this editor stops.
            writer = record_writer(
                self.servers, self.topic, metas[0].offset - 1, timeout_s, self.options
            )
            if writer is not MISSING and writer != self.editor_id:
                raise UpdateLogTaken(
                    f"the update log {self.topic} was taken over by editor store "
                    f"{writer or 'without an id'}; this editor ({self.editor_id}) no longer "
                    f"publishes, and its replicas follow the other one"
                )
        self._takeover_pending = False
        self._state["versions"] = sorted({*self._state["versions"], *sent_versions})
        self._state["current"] = target
        self._state["end_offset"] = metas[-1].offset + 1
        durable.write_bytes(self.state_file, json.dumps(self._state).encode())
        self.published = target
        self.bytes_published += sent_bytes
        if self.on_published is not None:
            self.on_published(target)
        log.info(
            "update log: version %d is current (%d new versions, %d bytes, offset %d)",
            target,
            len(sent_versions),
            sent_bytes,
            metas[-1].offset,
        )
        return True

    def _send(self, kind: str, version: int, payload: bytes) -> list[Any]:
        return [
            self._producer.send(self.topic, key=key, value=value, headers=headers, partition=0)
            for key, value, headers in messages(
                kind, version, payload, self.chunk_bytes, self.editor_id
            )
        ]

    def _run(self) -> None:
        from kafka.errors import KafkaError

        while not self._stop.is_set() and self.taken is None:
            self._wake.clear()
            try:
                self.publish_once()
                self.error = None
                self._wake.wait()
            except UpdateLogTaken as exc:
                self.taken, self.error = exc, str(exc)
                log.error("update log: %s", exc)
                if self.on_taken is not None:
                    self.on_taken(exc)
                return
            except (KafkaError, OSError) as exc:
                self.error = str(exc)
                log.warning(
                    "update log: publishing failed (%s); retrying in %.0fs", exc, self.retry_s
                )
                self._drop_producer()
                self._wake.wait(self.retry_s)
            except Exception as exc:
                self.error = str(exc)
                log.exception("update log: publishing failed; retrying")
                self._drop_producer()
                self._wake.wait(self.retry_s)

    def _drop_producer(self) -> None:
        if self._producer is not None:
            # A broken producer may fail to close too; a new one is made either way.
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)
            self._producer = None

    def _empty_state(self) -> dict[str, Any]:
        return {"topic": self.topic, "versions": [], "current": None, "end_offset": 0}

    def _read_state(self) -> dict[str, Any]:
        empty = self._empty_state()
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return empty
        except ValueError:
            log.warning("update log: %s is unreadable; republishing", self.state_file)
            return empty
        if state.get("topic") != self.topic:
            return empty
        return {**empty, **state}

    def _last_writer(self, timeout_s: float) -> tuple[int, str | None]:
        from kafka.errors import KafkaTimeoutError

        found = last_writer(self.servers, self.topic, timeout_s, self.options)
        if found is None:
            raise KafkaTimeoutError(f"the end of {self.topic} was not known in {timeout_s:.0f}s")
        return found

    def _foreign(self, end: int, writer: str | None) -> bool:
        """Whether the log's last record (at `end` - 1, by `writer`) is another editor's."""
        if end == 0 or writer == self.editor_id:
            return False
        # A record without an id: from an editor before store ids, which was this one if
        # this store published here before (its state file says so).
        return not (writer is None and self._state["end_offset"] > 0)


class UpdateLogReader:
    """Reads the update log from an offset and yields whole, checked records (a replica)."""

    def __init__(
        self,
        servers: Sequence[str],
        topic: str,
        *,
        start_offset: int = 0,
        chunk_bytes: int = 512 * 1024,
        options: dict[str, Any] | None = None,
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self._tp = TopicPartition(topic, 0)
        fetch = max(1 << 20, 2 * chunk_bytes)
        self._consumer = KafkaConsumer(
            bootstrap_servers=list(servers),
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=fetch,
            fetch_max_bytes=max(fetch, 50 << 20),
            **(options or {}),
        )
        self._consumer.assign([self._tp])
        self._consumer.seek(self._tp, start_offset)
        self._assembler = Assembler()
        self.position = start_offset

    def poll(self, timeout_s: float = 1.0) -> list[LogRecord | Refusal]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        out: list[LogRecord | Refusal] = []
        for records in batches.values():
            for r in records:
                result = self._assembler.feed(r.offset, r.value, list(r.headers or ()))
                self.position = r.offset + 1
                if result is not None:
                    out.append(result)
        return out

    def lag(self) -> int | None:
        """Records on the log after the last one read; None until the broker said."""
        high = self._consumer.highwater(self._tp)
        return None if high is None else max(0, high - self.position)

    def close(self) -> None:
        self._consumer.close()


MISSING: Any = object()  # record_writer: the record could not be read in time


def record_writer(
    servers: Sequence[str],
    topic: str,
    offset: int,
    timeout_s: float = 10.0,
    options: dict[str, Any] | None = None,
) -> Any:
    """The `editor` header of the record at `offset` (None: a record without one), or
    `MISSING` when it was not read within `timeout_s`."""
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(
        bootstrap_servers=list(servers), group_id=None, enable_auto_commit=False, **(options or {})
    )
    try:
        consumer.assign([tp])
        return _writer_at(consumer, tp, offset, time.monotonic() + timeout_s)
    finally:
        consumer.close()


def _writer_at(consumer: Any, tp: Any, offset: int, deadline: float) -> Any:
    consumer.seek(tp, offset)
    while time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                if r.offset == offset:
                    h = {k: (v or b"").decode("utf-8", "replace") for k, v in r.headers or ()}
                    return h.get("editor") or None
    return MISSING


def last_writer(
    servers: Sequence[str],
    topic: str,
    timeout_s: float = 10.0,
    options: dict[str, Any] | None = None,
    from_offset: int = 0,
) -> tuple[int, str | None] | None:
    """(the log's end offset, the `editor` header of its last record); (0, None) for an
    empty log; None when the broker did not say within `timeout_s`. The end is learnt from
    a fetch at `from_offset` (Tansu's `end_offsets` can be low): an offset known to be on the
    log keeps that fetch small."""
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(
        bootstrap_servers=list(servers), group_id=None, enable_auto_commit=False, **(options or {})
    )
    try:
        consumer.assign([tp])
        consumer.seek(tp, from_offset)
        deadline = time.monotonic() + timeout_s
        high = None
        while high is None and time.monotonic() < deadline:
            consumer.poll(timeout_ms=500, max_records=1)
            high = consumer.highwater(tp)
        if high is None:
            return None
        if high == 0 or high < from_offset:
            return high, None  # empty, or shorter than the caller knew: it republishes
        writer = _writer_at(consumer, tp, high - 1, deadline)
        return None if writer is MISSING else (high, writer)
    finally:
        consumer.close()
