"""Batching of consumed facts, free of Kafka and of clocks it does not own.

The consumer feeds every record it reads into a `Batcher`: valid facts with `add`, records it
dead-lettered with `hold` until the dead letter is acknowledged, then `release`. The batcher
folds duplicates, says when a batch is due (`batch_size` facts, or the oldest pending fact
waited `linger` seconds), hands batches out with `take`, and computes the offsets that are
safe to commit.

Offsets: Kafka commits one position per partition, "everything before this is done". A record
is done when it was dead-lettered, folded into a later fact, or applied in a durable version.
So the safe position of a partition is the lowest offset still pending or in flight there,
or, when nothing is, one past the last record consumed from it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from editd.facts import FactUpdate

Partition = tuple[str, int]
"""(topic, partition); kafka-python's `TopicPartition` is a namedtuple equal to it."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was read: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> Partition:
        return (self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class _Entry:
    fact: FactUpdate
    origin: Origin
    since: float  # when the slot this fact holds started waiting


@dataclass(frozen=True)
class FactBatch(Sequence[FactUpdate]):
    """One batch for the editor: a sequence of facts plus where each came from.

    `offsets` are the per-partition positions that become committable once this batch is
    durable (at the time it was taken); the store records them in the version's manifest.
    """

    seq: int
    facts: tuple[FactUpdate, ...]
    origins: tuple[Origin, ...]
    offsets: Mapping[Partition, int] = field(default_factory=dict)

    @overload
    def __getitem__(self, index: int) -> FactUpdate: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[FactUpdate]: ...
    def __getitem__(self, index: int | slice) -> FactUpdate | Sequence[FactUpdate]:
        return self.facts[index]

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[FactUpdate]:
        return iter(self.facts)

    @property
    def fact_ids(self) -> tuple[str, ...]:
        return tuple(f.fact_id for f in self.facts)

    def without(self, fact_ids: Collection[str]) -> FactBatch:
        """The same batch minus the given facts (those a crashed run already made durable)."""
        keep = [i for i, f in enumerate(self.facts) if f.fact_id not in fact_ids]
        return FactBatch(
            seq=self.seq,
            facts=tuple(self.facts[i] for i in keep),
            origins=tuple(self.origins[i] for i in keep),
            offsets=self.offsets,
        )


class FoldedQueue:
    """Facts in arrival order where a newer fact replaces any pending one it duplicates.

    Two facts are duplicates when they share an id, or the same subject and prompt (they
    would ask the editor for two different objects of one key: the later one is meant).
    The replacing fact goes to the back of the queue but keeps the earliest waiting time,
    so a fact updated over and over cannot postpone its batch forever.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._by_id: dict[str, int] = {}
        self._by_relation: dict[tuple[str, str], int] = {}
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_Entry]:
        return iter(self._entries.values())

    def push(self, entry: _Entry) -> list[_Entry]:
        """Append `entry`; return the pending entries it replaced."""
        keys = {self._by_id.get(entry.fact.fact_id), self._by_relation.get(entry.fact.relation_key)}
        replaced = [self._remove(k) for k in keys if k is not None]
        if replaced:
            since = min([entry.since, *(r.since for r in replaced)])
            entry = _Entry(entry.fact, entry.origin, since)
        key = next(self._serial)
        self._entries[key] = entry
        self._by_id[entry.fact.fact_id] = key
        self._by_relation[entry.fact.relation_key] = key
        return replaced

    def pop_front(self, n: int) -> list[_Entry]:
        keys = list(itertools.islice(self._entries, n))
        return [self._remove(k) for k in keys]

    def remove_where(self, predicate: Callable[[_Entry], bool]) -> list[_Entry]:
        keys = [k for k, e in self._entries.items() if predicate(e)]
        return [self._remove(k) for k in keys]

    def oldest_since(self) -> float | None:
        return min((e.since for e in self._entries.values()), default=None)

    def _remove(self, key: int) -> _Entry:
        entry = self._entries.pop(key)
        del self._by_id[entry.fact.fact_id]
        del self._by_relation[entry.fact.relation_key]
        return entry


def fold_duplicates(facts: Iterable[FactUpdate]) -> list[FactUpdate]:
    """Facts with duplicates folded (same id, or same subject and prompt): the later wins."""
    queue = FoldedQueue()
    for i, fact in enumerate(facts):
        queue.push(_Entry(fact, Origin("", 0, i), 0.0))
    return [e.fact for e in queue]


class Batcher:
    """Accumulates facts into batches and tracks which offsets are safe to commit.

    Not thread-safe: the consumer's poll loop owns it. `clock` is injectable so tests can
    drive `linger` without sleeping.
    """

    def __init__(
        self,
        batch_size: int,
        linger: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self.batch_size = batch_size
        self.linger = linger
        self._clock = clock
        self._pending = FoldedQueue()
        # Lowest offset per partition of each batch handed out and not yet durable.
        self._in_flight: dict[int, dict[Partition, int]] = {}
        self._consumed_end: dict[Partition, int] = {}
        self._held: dict[Partition, set[int]] = {}
        self._committed: dict[Partition, int] = {}
        self._seq = itertools.count(1)
        self.folded = 0
        self.dropped = 0

    # -- intake ---------------------------------------------------------------------------

    def add(self, fact: FactUpdate, origin: Origin) -> None:
        """A valid fact read at `origin`."""
        self._consumed(origin)
        self.folded += len(self._pending.push(_Entry(fact, origin, self._clock())))

    def hold(self, origin: Origin, end: int | None = None) -> None:
        """A record read at `origin` that is not done yet (a dead letter awaiting the broker's
        acknowledgement): it holds back its partition's offset until `release`.

        `end` says the letter stands for every offset up to it (a batch that could not be
        decoded): once released, the partition's position moves past them all.
        """
        self._consumed(origin)
        if end is not None and end > origin.offset + 1:
            self._consumed_end[origin.tp] = end
        self._held.setdefault(origin.tp, set()).add(origin.offset)

    def release(self, origin: Origin) -> None:
        held = self._held.get(origin.tp)
        if held is not None:
            held.discard(origin.offset)
            if not held:
                del self._held[origin.tp]

    def _consumed(self, origin: Origin) -> None:
        if origin.tp not in self._consumed_end:
            # The first record read from a partition sits at the group's committed position
            # (or where the reset policy put it): committing that position again is a no-op.
            self._committed.setdefault(origin.tp, origin.offset)
        # Assigned, not maxed: records of a partition arrive in order, so an offset lower than
        # the last means the position was rewound (a seek, or an in-memory broker restarted
        # empty), and the old end would point past the new log.
        self._consumed_end[origin.tp] = origin.offset + 1

    # -- batches --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def ready(self) -> bool:
        return self.time_to_ready() == 0.0

    def time_to_ready(self) -> float | None:
        """Seconds until a batch is due: 0 if due now, None if nothing is pending."""
        oldest = self._pending.oldest_since()
        if oldest is None:
            return None
        if len(self._pending) >= self.batch_size:
            return 0.0
        return max(0.0, self.linger - (self._clock() - oldest))

    def take(self) -> FactBatch | None:
        """Up to `batch_size` pending facts, oldest first; they stay uncommittable until
        `complete` is called with the batch."""
        entries = self._pending.pop_front(self.batch_size)
        if not entries:
            return None
        seq = next(self._seq)
        lowest: dict[Partition, int] = {}
        for e in entries:
            tp = e.origin.tp
            lowest[tp] = min(lowest.get(tp, e.origin.offset), e.origin.offset)
        self._in_flight[seq] = lowest
        return FactBatch(
            seq=seq,
            facts=tuple(e.fact for e in entries),
            origins=tuple(e.origin for e in entries),
            offsets=self._committable(exclude=seq),
        )

    def complete(self, batch: FactBatch) -> None:
        """The batch is durable: its records no longer hold back their partitions' offsets."""
        self._in_flight.pop(batch.seq, None)

    # -- offsets --------------------------------------------------------------------------

    def committable(self) -> dict[Partition, int]:
        """Per partition, the position before which every consumed record is done."""
        return self._committable()

    def _committable(self, exclude: int | None = None) -> dict[Partition, int]:
        out = dict(self._consumed_end)
        for e in self._pending:
            tp = e.origin.tp
            out[tp] = min(out[tp], e.origin.offset)
        for tp, held in self._held.items():
            if tp in out:
                out[tp] = min(out[tp], *held)
        for seq, lowest in self._in_flight.items():
            if seq == exclude:
                continue
            for tp, offset in lowest.items():
                if tp in out:
                    out[tp] = min(out[tp], offset)
        return out

    def to_commit(self, partitions: Collection[Partition] | None = None) -> dict[Partition, int]:
        """Committable positions that differ from the last committed ones.

        `partitions` restricts the answer to partitions this member still owns: committing
        for a partition that moved to another member would overwrite that member's progress.
        """
        return {
            tp: offset
            for tp, offset in self._committable().items()
            if (partitions is None or tp in partitions) and self._committed.get(tp) != offset
        }

    def mark_committed(self, offsets: Mapping[Partition, int]) -> None:
        self._committed.update(offsets)

    def partitions(self) -> set[Partition]:
        """Partitions this batcher holds any state for."""
        return set(self._consumed_end) | set(self._committed) | set(self._held)

    def committed_position(self, tp: Partition) -> int | None:
        """The last position committed for `tp` (or where reading started); None if unread."""
        return self._committed.get(tp)

    # -- rebalance ------------------------------------------------------------------------

    def revoke(self, partitions: Iterable[Partition]) -> int:
        """Forget partitions this member lost; return how many pending facts were dropped.

        Their records were not committed, so the partition's next owner reads them again.
        A batch already in flight keeps its facts (the editor is working on them); its
        offsets for the lost partitions will simply not be committed by this member.
        """
        lost: set[Partition] = {(tp[0], tp[1]) for tp in partitions}
        dropped = self._pending.remove_where(lambda e: e.origin.tp in lost)
        for tp in lost:
            self._consumed_end.pop(tp, None)
            self._committed.pop(tp, None)
            self._held.pop(tp, None)
        for lowest in self._in_flight.values():
            for tp in lost:
                lowest.pop(tp, None)
        self.dropped += len(dropped)
        return len(dropped)
