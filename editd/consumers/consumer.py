"""The fact consumer: a Kafka consumer-group member that turns the topic into edit batches.

One poll loop (`FactConsumer.run`) with explicit states:

    STARTING ──> RUNNING ──(batch due)──> EDITING ──(apply_batch returned)──> RUNNING
                    │                        │
                    └──────── stop() ────────┴──> STOPPING ──> STOPPED

* RUNNING: poll, validate each record, dead-letter the invalid ones, feed the `Batcher`.
* EDITING: `apply_batch` runs in a worker thread. Every assigned partition is paused and the
  loop keeps polling, so the member keeps its place in the group however long the edit takes
  (an edit can take minutes; `max_poll_interval_ms` would otherwise expel the member).
* Offsets are committed only for records that are done: dead letters the broker acknowledged,
  and facts whose batch `apply_batch` returned for (the daemon returns only once the version
  is durable). A crash in between redelivers the batch; `known_fact_ids` lets the store say
  which of its facts are already in a version, so they are not applied twice.

Nothing here imports torch: the editor is reached only through the `apply_batch` callable.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    CorruptRecordError,
    KafkaError,
    RetriableError,
    SaslAuthenticationFailedError,
    UnsupportedCodecError,
)
from kafka.structs import OffsetAndMetadata

from editd.config import FactLimits, KafkaSettings
from editd.consumers.batching import Batcher, FactBatch, Origin, Partition
from editd.consumers.security import KafkaSecurityError, client_options
from editd.consumers.undecodable import BadBatch, describe, drop_fetched, locate, take_pending_error
from editd.facts import FactError, parse_fact

log = logging.getLogger(__name__)

ApplyBatch = Callable[[FactBatch], None]
"""Applies a batch and returns only once its version is durable; raising leaves it uncommitted."""
KnownFactIds = Callable[[Sequence[str]], Collection[str]]
"""Of the given fact ids, those already applied in a durable version."""

POLL_INTERVAL_S = 0.5
"""Longest poll while idle: bounds how late `stop()` and a due `linger` are noticed."""
EDIT_POLL_INTERVAL_S = 0.1
"""Poll interval while an edit runs: heartbeats and the edit's completion are seen promptly."""
STOP_FLUSH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Backoff:
    """Exponential retry delays: `initial`, ×`factor` each time, capped at `maximum`."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(self.maximum, delay * self.factor)


REBUILD_AFTER_S = 60.0
"""After this long without a group coordinator, the Kafka clients are replaced."""
RECONNECT_BACKOFF = Backoff(initial=0.5, maximum=30.0)
"""Between attempts to reach a broker that is gone (connect, commit, dead-letter)."""


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    EDITING = "editing"
    STOPPING = "stopping"
    STOPPED = "stopped"


class BatchFailed(RuntimeError):
    """`apply_batch` raised; the batch was not committed and will be delivered again."""

    def __init__(self, batch: FactBatch, cause: BaseException) -> None:
        super().__init__(f"applying batch {batch.seq} of {len(batch)} facts failed: {cause!r}")
        self.batch = batch


@dataclass
class ConsumerStats:
    """Counters for the daemon to export. Written only by the poll loop; plain ints, so
    another thread may read them at any time."""

    consumed: int = 0
    """Records read from the fact topic (valid or not, redeliveries included)."""
    dead_lettered: int = 0
    """Invalid records the dead-letter topic acknowledged."""
    undecodable_batches: int = 0
    """Record batches no fetch could decode, skipped (each one dead letter)."""
    applied: int = 0
    """Facts in batches `apply_batch` returned for."""
    already_applied: int = 0
    """Redelivered facts `known_fact_ids` recognised and skipped."""
    folded: int = 0
    """Facts replaced by a later duplicate before being applied."""
    batches: int = 0
    """Batches `apply_batch` returned for."""
    revoked_dropped: int = 0
    """Pending facts dropped because their partition moved to another member."""
    commits: int = 0
    """Offset commits the group accepted."""
    broker_errors: int = 0
    """Kafka failures the loop retried: connect, poll, commit (not a rebalance's rejection),
    dead-letter send or acknowledgement, and each rebuild after losing the coordinator."""
    last_commit_monotonic: float | None = None
    lag_by_partition: dict[Partition, int] = field(default_factory=dict)


@dataclass
class _DeadLetter:
    origin: Origin
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    future: Any = None
    retry_at: float = 0.0


class _RebalanceRecorder(ConsumerRebalanceListener):
    """Only records what happened: the loop applies it after the poll that caused it.

    kafka-python 3.0.12 runs these callbacks on its network loop, the one that heartbeats;
    anything that blocks there (a commit, a join on the edit thread) gets the member expelled
    or kills the consumer. A queue put cannot block.
    """

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, list[Partition]]] = queue.SimpleQueue()

    def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        self.events.put(("revoked", [(tp.topic, tp.partition) for tp in revoked]))

    def on_partitions_lost(self, lost: Collection[TopicPartition]) -> None:
        self.events.put(("lost", [(tp.topic, tp.partition) for tp in lost]))

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self.events.put(("assigned", [(tp.topic, tp.partition) for tp in assigned]))


class FactConsumer:
    """A consumer-group member feeding fact batches to `apply_batch`.

    `run()` blocks in the poll loop; `stop()` may be called from any thread (the daemon's
    signal handler) and makes `run()` return once what is durable is committed.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        limits: FactLimits,
        apply_batch: ApplyBatch,
        known_fact_ids: KnownFactIds | None = None,
        *,
        bootstrap_servers: Sequence[str] | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        client_config: Mapping[str, Any] | None = None,
        rebuild_after_s: float = REBUILD_AFTER_S,
    ) -> None:
        servers = list(bootstrap_servers or kafka.bootstrap_servers)
        if not servers:
            raise ValueError("no bootstrap servers: configure kafka.bootstrap_servers")
        self.kafka = kafka
        self.limits = limits
        self.bootstrap_servers = servers
        self.apply_batch = apply_batch
        self.known_fact_ids = known_fact_ids
        self.backoff = backoff
        self.stats = ConsumerStats()
        self.batcher = Batcher(kafka.batch_size, kafka.linger_seconds, clock=clock)
        self._clock = clock
        self._client_config = dict(client_config or {})
        self._state = State.STARTING
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._abandon = False
        self._listener = _RebalanceRecorder()
        # Revoked partitions and their committed position, until the next assignment says
        # whether they came back (then the loop seeks there) or moved to another member.
        self._rewind: dict[Partition, int] = {}
        self._coordinator_lost_at: float | None = None
        self.rebuild_after_s = rebuild_after_s
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._edit: tuple[FactBatch, concurrent.futures.Future[int]] | None = None
        self._dead_letters: list[_DeadLetter] = []
        self._failure: BatchFailed | None = None
        self._commit_backoff: Iterator[float] = backoff.delays()
        self._next_commit_at = 0.0
        self._lag: int | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def lag(self) -> int | None:
        """Records on the assigned partitions not yet durably done, summed; None until known.

        Computed from the fetch high-water mark, not `end_offsets()`: Tansu 0.6 answers
        ListOffsets with a low end offset, while the fetch response's high-water mark is right.
        Refreshed by the poll loop, so it is safe to read from any thread.
        """
        return self._lag

    def stop(self, abandon_in_flight: bool = False) -> None:
        """Stop polling and return from `run()`; safe from any thread or signal handler.

        By default a batch being edited is waited for and committed. With
        `abandon_in_flight`, `run()` returns without waiting: the batch stays uncommitted and
        is delivered again (the edit thread cannot be killed; if it still makes the version
        durable, `known_fact_ids` recognises the facts on redelivery).
        """
        self._abandon = self._abandon or abandon_in_flight
        self._stop.set()

    def run(self) -> None:
        """The poll loop. Returns after `stop()`; raises `BatchFailed` if an edit failed."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="editd-apply"
        )
        try:
            if not self._connect():
                return
            self._set_state(State.RUNNING)
            self._loop()
        finally:
            self._shutdown()
        if self._failure is not None:
            raise self._failure

    # -- connection -----------------------------------------------------------------------

    def _connect(self) -> bool:
        """Create the clients, retrying while no broker answers; False if stopped first."""
        delays = self.backoff.delays()
        while not self._stop.is_set():
            try:
                self._producer = self._new_producer()
                self._consumer = self._new_consumer()
                self._consumer.subscribe([self.kafka.topic], listener=self._listener)
                log.info(
                    "consuming %s as group %s from %s",
                    self.kafka.topic,
                    self.kafka.group_id,
                    ",".join(self.bootstrap_servers),
                )
                return True
            except KafkaError as exc:
                self._close_clients()
                self.stats.broker_errors += 1
                delay = next(delays)
                log.warning("cannot reach Kafka (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
        return False

    def _common_config(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.kafka.client_id,
            # Fail construction within seconds when no broker answers, so the retry loop (and
            # stop()) stay responsive; kafka-python's default is 30 s.
            "bootstrap_timeout_ms": self.kafka.connect_timeout_ms,
            "reconnect_backoff_max_ms": int(self.backoff.maximum * 1000),
            **client_options(self.kafka),
        }

    def _new_consumer(self) -> KafkaConsumer:
        session = self.kafka.session_timeout_ms
        config: dict[str, Any] = {
            **self._common_config(),
            "group_id": self.kafka.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": session,
            "heartbeat_interval_ms": max(100, session // 3),
            "max_partition_fetch_bytes": max(1 << 20, self.kafka.max_message_bytes),
            # Bounds how long a topic re-created after a broker restart stays unseen.
            "metadata_max_age_ms": 10_000,
            # Tansu does not auto-create topics; neither should a consumer elsewhere.
            "allow_auto_create_topics": False,
        }
        config.update(self._client_config)
        return KafkaConsumer(**config)

    def _new_producer(self) -> KafkaProducer:
        return KafkaProducer(
            **self._common_config(),
            acks="all",
            max_request_size=max(1 << 20, self.kafka.max_message_bytes + 4096),
        )

    # -- the loop -------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        with self._state_lock:
            if self._state is not state:
                log.debug("consumer %s -> %s", self._state.value, state.value)
                self._state = state

    def _loop(self) -> None:
        poll_errors = self.backoff.delays()
        while True:
            if self._stop.is_set() and self._state is not State.STOPPING:
                self._set_state(State.STOPPING)
                log.info("stopping: %d facts pending are left for redelivery", self.batcher.pending)
            if self._state is State.STOPPING and (self._edit is None or self._abandon):
                return
            consumer = self._consumer
            if consumer is None:  # a rebuild was stopped before it reconnected
                return
            try:
                records = consumer.poll(timeout_ms=self._poll_timeout_ms())
                poll_errors = self.backoff.delays()
            except Exception as exc:
                if isinstance(exc, SaslAuthenticationFailedError | AuthorizationError):
                    raise KafkaSecurityError(
                        f"kafka.sasl_username: the broker refused it ({describe(exc)})"
                    ) from exc
                # A record batch that cannot be decoded raises out of poll() for its whole
                # partition, whatever the error: find it, dead-letter it, read on after it.
                if not isinstance(exc, RetriableError) and self._skip_undecodable(consumer, exc):
                    continue
                self.stats.broker_errors += 1
                delay = next(poll_errors)
                log.warning("poll failed (%s); retrying in %.1fs", describe(exc), delay)
                self._stop.wait(delay)
                continue
            if self._coordinator_lost_too_long(consumer):
                self._rebuild()
                continue
            # Rebalance events first: they describe the assignment before these records.
            rewound = self._handle_rebalance(consumer)
            for tp, tp_records in records.items():
                key = (tp.topic, tp.partition)
                if key in rewound or key in self._rewind:
                    # Fetched from a position this member no longer trusts (revoked, or just
                    # rewound): the same records come again from the committed position.
                    continue
                for record in tp_records:
                    self._handle_record(record)
            # After the records before it, and before anything is paused (see the function).
            held_back = take_pending_error(consumer)
            if held_back is not None:
                bad = locate(held_back)
                stale = bad is not None and (bad.tp in rewound or bad.tp in self._rewind)
                if stale or not self._skip_undecodable(consumer, held_back):
                    log.warning("a fetch failed (%s); read again", describe(held_back))
            self._check_dead_letters()

            if self._state is State.RUNNING and self.batcher.ready():
                self._start_edit(consumer)
            elif self._edit is not None and self._edit[1].done():
                self._finish_edit(consumer)
                if self._failure is not None:
                    return
            if self._edit is not None:
                # Newly assigned partitions arrive unpaused; pausing one partition and
                # resuming another can starve it in kafka-python, so always pause them all.
                consumer.pause(*consumer.assignment())
            self._commit_done(consumer)
            self._update_lag(consumer)

    def _coordinator_lost_too_long(self, consumer: KafkaConsumer) -> bool:
        """True once the group coordinator has been unreachable for `rebuild_after_s`.

        kafka-python reconnects by itself, but seen here once in six broker restarts under
        load, its client stayed at "No node available for metadata refresh" for minutes after
        the broker was back. New clients recover from that. `coordinator_unknown()` is not
        public API; without it this watchdog is simply off.
        """
        probe = getattr(getattr(consumer, "_coordinator", None), "coordinator_unknown", None)
        if not callable(probe) or not probe():
            self._coordinator_lost_at = None
            return False
        now = self._clock()
        if self._coordinator_lost_at is None:
            self._coordinator_lost_at = now
        return now - self._coordinator_lost_at > self.rebuild_after_s

    def _rebuild(self) -> None:
        """Replace the Kafka clients; everything not committed is read again."""
        log.warning(
            "no group coordinator for %.0fs: reconnecting with new Kafka clients",
            self.rebuild_after_s,
        )
        self.stats.broker_errors += 1
        self._coordinator_lost_at = None
        partitions = self.batcher.partitions()
        self.stats.revoked_dropped += self.batcher.revoke(partitions)
        self._dead_letters.clear()
        self._rewind.clear()
        self._close_clients()
        self._listener = _RebalanceRecorder()  # events of the old client are stale
        connected = self._connect()
        consumer = self._consumer
        if connected and consumer is not None and self._edit is not None:
            consumer.pause(*consumer.assignment())

    def _poll_timeout_ms(self) -> int:
        if self._edit is not None or self._state is State.STOPPING:
            return int(EDIT_POLL_INTERVAL_S * 1000)
        due = self.batcher.time_to_ready()
        wait = POLL_INTERVAL_S if due is None else min(POLL_INTERVAL_S, due)
        if self._dead_letters:
            wait = min(wait, EDIT_POLL_INTERVAL_S)
        return max(0, int(wait * 1000))

    def _handle_rebalance(self, consumer: KafkaConsumer) -> set[Partition]:
        """Apply the rebalance events of the last poll; return the partitions rewound."""
        rewound: set[Partition] = set()
        while True:
            try:
                kind, partitions = self._listener.events.get_nowait()
            except queue.Empty:
                return rewound
            if not partitions:
                continue
            if kind == "assigned":
                # kafka-python 3.0.12 keeps the fetch position of a partition that is revoked
                # and assigned straight back (eager rebalance), but its pending facts were
                # dropped on revocation: read it again from the last committed position.
                for tp in partitions:
                    offset = self._rewind.pop(tp, None)
                    if offset is not None:
                        consumer.seek(TopicPartition(*tp), offset)
                        rewound.add(tp)
                self._rewind.clear()
                log.info("assigned %s", _fmt(partitions))
                continue
            for tp in partitions:
                offset = self.batcher.committed_position(tp)
                if offset is not None:
                    self._rewind[tp] = offset
            dropped = self.batcher.revoke(partitions)
            lost = set(partitions)
            kept = [d for d in self._dead_letters if d.origin.tp not in lost]
            self._dead_letters = kept
            self.stats.revoked_dropped += dropped
            log.info(
                "%s %s: %d pending facts dropped (read again by the partition's next owner)",
                kind,
                _fmt(partitions),
                dropped,
            )

    def _handle_record(self, record: Any) -> None:
        self.stats.consumed += 1
        origin = Origin(record.topic, record.partition, record.offset)
        try:
            fact = parse_fact(record.value, self.limits)
        except FactError as exc:
            self._dead_letter(record, origin, exc.reason)
            return
        except Exception as exc:  # no record may end the loop, whatever is wrong with it
            self._dead_letter(record, origin, f"unreadable record: {describe(exc)}")
            return
        folded_before = self.batcher.folded
        self.batcher.add(fact, origin)
        self.stats.folded += self.batcher.folded - folded_before

    # -- dead letters ---------------------------------------------------------------------

    def _dead_letter(self, record: Any, origin: Origin, reason: str) -> None:
        log.warning("dead-lettering %s/%d@%d: %s", *_where(origin), reason)
        # The producer's own headers (a trace id, its source) first, editd's after them; a
        # null value is sent empty (kafka-python's producer takes bytes only).
        own = [(str(k), v if v is not None else b"") for k, v in (record.headers or [])]
        headers = own + _reason_headers(origin, reason)
        letter = _DeadLetter(origin, record.key, record.value, headers)
        # Held, not done: its offset must not be committed before the broker has the letter.
        self.batcher.hold(origin)
        self._dead_letters.append(letter)
        self._send_dead_letter(letter)

    def _skip_undecodable(self, consumer: KafkaConsumer, exc: BaseException) -> bool:
        """Dead-letter the batch `exc` was raised decoding and seek past it; False if it
        cannot be told which batch that was (then the caller retries the poll)."""
        bad = locate(exc)
        if bad is None:
            # Only an error of decoding may cost an offset; a broker's refusal never does.
            decoding = not isinstance(exc, KafkaError) or isinstance(
                exc, UnsupportedCodecError | CorruptRecordError
            )
            fetchable = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
            if not decoding or len(fetchable) != 1:
                log.error(
                    "a fetch failed (%s) and its partition is unknown; retrying", describe(exc)
                )
                return False
            bad = BadBatch((fetchable[0].topic, fetchable[0].partition), None, None, None)
        tp = TopicPartition(*bad.tp)
        if tp not in consumer.assignment():
            return True  # revoked meanwhile: its next owner meets the batch again
        first = consumer.position(tp)
        if first is None:
            return False
        end = bad.next_offset if bad.next_offset is not None and bad.next_offset > first else None
        end = end or first + 1  # the batch's extent unknown: one offset at a time
        origin = Origin(tp.topic, tp.partition, first)
        reason = f"undecodable record batch at offsets {first}-{end - 1}: {describe(exc)}"
        log.warning("dead-lettering %s/%d@%d: %s", *_where(origin), reason)
        headers = [
            *_reason_headers(origin, reason),
            ("original_last_offset", str(end - 1).encode("ascii")),
            # The value is the batch as fetched (Kafka's record batch format, compressed).
            ("value_format", b"kafka-record-batch" if bad.raw is not None else b"none"),
        ]
        letter = _DeadLetter(origin, None, bad.raw, headers)
        self.batcher.hold(origin, end=end)
        self._dead_letters.append(letter)
        self.stats.consumed += 1
        self.stats.undecodable_batches += 1
        drop_fetched(consumer, bad.tp)
        consumer.seek(tp, end)
        self._send_dead_letter(letter)
        return True

    def _send_dead_letter(self, letter: _DeadLetter) -> None:
        assert self._producer is not None
        try:
            letter.future = self._producer.send(
                self.kafka.dlq, key=letter.key, value=letter.value, headers=letter.headers
            )
        except KafkaError as exc:
            letter.future = None
            letter.retry_at = self._clock() + self.backoff.initial
            self.stats.broker_errors += 1
            self._shrink_if_refused(letter, exc)
            log.warning("cannot send a dead letter (%s); will retry", exc)

    @staticmethod
    def _shrink_if_refused(letter: _DeadLetter, exc: BaseException) -> None:
        """A letter refused for what it is (too large, say) would be refused for ever: send
        its headers alone, saying why the value is missing."""
        if isinstance(exc, RetriableError) or (letter.key is None and letter.value is None):
            return
        letter.key = letter.value = None
        letter.headers = [*letter.headers, ("value_dropped", describe(exc).encode("utf-8"))]

    def _check_dead_letters(self) -> None:
        still: list[_DeadLetter] = []
        now = self._clock()
        for letter in self._dead_letters:
            if letter.future is None:
                if now >= letter.retry_at:
                    self._send_dead_letter(letter)
                still.append(letter)
            elif not letter.future.is_done:
                still.append(letter)
            elif letter.future.failed():
                self.stats.broker_errors += 1
                log.warning("dead letter not acknowledged (%s); resending", letter.future.exception)
                self._shrink_if_refused(letter, letter.future.exception)
                letter.future = None
                letter.retry_at = now + self.backoff.initial
                still.append(letter)
            else:
                self.batcher.release(letter.origin)
                self.stats.dead_lettered += 1
        self._dead_letters = still

    # -- edits ----------------------------------------------------------------------------

    def _start_edit(self, consumer: KafkaConsumer) -> None:
        batch = self.batcher.take()
        if batch is None:
            return
        consumer.pause(*consumer.assignment())
        assert self._executor is not None
        self._set_state(State.EDITING)
        self._edit = (batch, self._executor.submit(self._apply, batch))
        log.info("editing batch %d: %d facts", batch.seq, len(batch))

    def _apply(self, batch: FactBatch) -> int:
        """Runs in the edit thread: skip facts a crashed run already applied, apply the rest."""
        todo = batch
        if self.known_fact_ids is not None:
            known = set(self.known_fact_ids(batch.fact_ids))
            if known:
                todo = batch.without(known)
                log.info("batch %d: %d facts already applied, skipped", batch.seq, len(known))
        if len(todo):
            self.apply_batch(todo)
        return len(todo)

    def _finish_edit(self, consumer: KafkaConsumer) -> None:
        assert self._edit is not None
        batch, future = self._edit
        self._edit = None
        exc = future.exception()
        if exc is not None:
            # Not committed: the group delivers the batch again, here or to another member.
            # The daemon decides what a failing edit means, so the error surfaces from run().
            self._failure = BatchFailed(batch, exc)
            log.error("batch %d failed: %r", batch.seq, exc)
            self._set_state(State.STOPPING)
            return
        applied = future.result()
        self.batcher.complete(batch)
        self.stats.batches += 1
        self.stats.applied += applied
        self.stats.already_applied += len(batch) - applied
        self._next_commit_at = 0.0  # commit now, whatever the backoff said
        if self._state is State.EDITING:
            consumer.resume(*consumer.paused())
            self._set_state(State.RUNNING)

    # -- offsets --------------------------------------------------------------------------

    def _commit_done(self, consumer: KafkaConsumer, force: bool = False) -> bool:
        """Commit what is done on the partitions this member owns; True if nothing is left."""
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        offsets = self.batcher.to_commit(owned)
        if not offsets:
            return True
        if not force and self._clock() < self._next_commit_at:
            return False
        try:
            consumer.commit(
                {TopicPartition(*tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            )
        except CommitFailedError as exc:
            # The group rebalanced under us: the revocation arrives with the next poll and the
            # records of partitions that moved are delivered again to their new owner.
            self._next_commit_at = self._clock() + next(self._commit_backoff)
            log.warning("commit rejected by the group (%s); will retry after the rebalance", exc)
            return False
        except KafkaError as exc:
            self.stats.broker_errors += 1
            delay = next(self._commit_backoff)
            self._next_commit_at = self._clock() + delay
            log.warning("commit failed (%s); retrying in %.1fs", exc, delay)
            return False
        self.batcher.mark_committed(offsets)
        self._commit_backoff = self.backoff.delays()
        self.stats.commits += 1
        self.stats.last_commit_monotonic = self._clock()
        log.debug("committed %s", offsets)
        return True

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        done = self.batcher.committable()
        lags: dict[Partition, int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue  # no fetch response yet (or paused since assignment)
            key = (tp.topic, tp.partition)
            position = done.get(key)
            if position is None:
                position = consumer.position(tp)
            if position is not None:
                lags[key] = max(0, high - position)
        self.stats.lag_by_partition = lags
        self._lag = sum(lags.values()) if lags else None

    # -- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        consumer = self._consumer
        if consumer is not None and self._failure is None:
            self._drain_dead_letters()
            try:
                self._commit_done(consumer, force=True)
            except Exception:
                log.exception("final commit failed; uncommitted records will be redelivered")
        if self._executor is not None:
            # Abandoned edits keep running (a thread cannot be killed); do not wait for them.
            self._executor.shutdown(wait=self._edit is None, cancel_futures=True)
            self._executor = None
        self._close_clients()
        self._set_state(State.STOPPED)
        log.info(
            "consumer stopped: %d consumed, %d applied, %d dead-lettered",
            self.stats.consumed,
            self.stats.applied,
            self.stats.dead_lettered,
        )

    def _drain_dead_letters(self) -> None:
        if not self._dead_letters or self._producer is None:
            return
        deadline = time.monotonic() + STOP_FLUSH_TIMEOUT_S
        while self._dead_letters and time.monotonic() < deadline:
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaError as exc:
                log.warning("flushing dead letters failed: %s", exc)
            self._check_dead_letters()
            if self._dead_letters:
                time.sleep(0.1)

    def _close_clients(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=5000)
            except Exception:
                log.exception("closing the Kafka consumer failed")
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:
                log.exception("closing the Kafka producer failed")


def _reason_headers(origin: Origin, reason: str) -> list[tuple[str, bytes]]:
    return [
        ("error", reason.encode("utf-8")),
        ("original_topic", origin.topic.encode("utf-8")),
        ("original_partition", str(origin.partition).encode("ascii")),
        ("original_offset", str(origin.offset).encode("ascii")),
    ]


def _where(origin: Origin) -> tuple[str, int, int]:
    return origin.topic, origin.partition, origin.offset


def _fmt(partitions: Sequence[Partition]) -> str:
    return ", ".join(f"{t}/{p}" for t, p in sorted(partitions)) or "nothing"


__all__ = [
    "RECONNECT_BACKOFF",
    "ApplyBatch",
    "Backoff",
    "BatchFailed",
    "ConsumerStats",
    "FactConsumer",
    "KnownFactIds",
    "State",
]
