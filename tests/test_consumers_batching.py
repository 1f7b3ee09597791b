"""Batching, duplicate folding and commit offsets: pure, no broker."""

from __future__ import annotations

import pytest

from editd.consumers.batching import Batcher, FactBatch, Origin, fold_duplicates
from editd.facts import FactUpdate


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fact(
    subject: str, target: str = "Paris", prompt: str = "{} lives in", **kw: object
) -> FactUpdate:
    return FactUpdate(subject=subject, prompt=prompt, target_new=target, **kw)


def at(offset: int, partition: int = 0, topic: str = "facts") -> Origin:
    return Origin(topic, partition, offset)


def test_batch_is_due_at_batch_size() -> None:
    clock = FakeClock()
    b = Batcher(batch_size=3, linger=60.0, clock=clock)
    assert b.time_to_ready() is None and not b.ready()
    b.add(fact("a"), at(0))
    b.add(fact("b"), at(1))
    assert not b.ready()
    assert b.time_to_ready() == pytest.approx(60.0)
    b.add(fact("c"), at(2))
    b.add(fact("d"), at(3))
    assert b.ready()
    batch = b.take()
    assert batch is not None
    assert [f.subject for f in batch] == ["a", "b", "c"]
    assert [o.offset for o in batch.origins] == [0, 1, 2]
    assert b.pending == 1 and not b.ready()


def test_partial_batch_is_due_when_the_oldest_fact_waited_linger() -> None:
    clock = FakeClock()
    b = Batcher(batch_size=100, linger=2.0, clock=clock)
    b.add(fact("a"), at(0))
    clock.now += 1.5
    b.add(fact("b"), at(1))
    assert b.time_to_ready() == pytest.approx(0.5)
    clock.now += 0.5
    assert b.ready()
    batch = b.take()
    assert batch is not None and len(batch) == 2
    assert b.take() is None


def test_later_duplicate_wins_by_id_and_by_subject_and_prompt() -> None:
    clock = FakeClock()
    b = Batcher(batch_size=10, linger=5.0, clock=clock)
    b.add(fact("a", "Paris", id="x1"), at(0))
    b.add(fact("b", "Rome"), at(1))
    clock.now += 3.0
    b.add(fact("c", "Oslo", id="x1"), at(2))  # same id as offset 0
    b.add(fact("b", "Lima"), at(3))  # same subject and prompt as offset 1
    b.add(fact("b", "Kyiv", prompt="{} was born in"), at(4))  # another relation: kept
    assert b.pending == 3 and b.folded == 2
    # The replacements keep the waiting time of the facts they replaced.
    assert b.time_to_ready() == pytest.approx(2.0)
    clock.now += 2.0
    batch = b.take()
    assert batch is not None
    assert [(f.subject, f.target_new) for f in batch] == [
        ("c", "Oslo"),
        ("b", "Lima"),
        ("b", "Kyiv"),
    ]
    assert [o.offset for o in batch.origins] == [2, 3, 4]


def test_a_fact_duplicating_two_pending_facts_replaces_both() -> None:
    b = Batcher(batch_size=10, linger=5.0, clock=FakeClock())
    b.add(fact("a", "Paris", id="x1"), at(0))
    b.add(fact("b", "Rome"), at(1))
    b.add(fact("b", "Oslo", id="x1"), at(2))
    assert b.pending == 1 and b.folded == 2


def test_fold_duplicates_function() -> None:
    facts = [fact("a", "Paris"), fact("b", "Rome"), fact("a", "Oslo"), fact("a", "Oslo")]
    assert [(f.subject, f.target_new) for f in fold_duplicates(facts)] == [
        ("b", "Rome"),
        ("a", "Oslo"),
    ]


def test_commit_offsets_cover_dead_letters_and_folded_records_but_not_pending() -> None:
    b = Batcher(batch_size=2, linger=5.0, clock=FakeClock())
    b.add(fact("a"), at(0))
    b.hold(at(1))  # dead letter in flight to the DLQ
    b.add(fact("a", "Rome"), at(2))  # folds offset 0
    b.add(fact("b"), at(3))
    b.add(fact("c"), at(4))  # stays pending after the batch is taken
    assert b.committable() == {("facts", 0): 1}  # offset 0 is folded; 1 awaits the broker
    b.release(at(1))
    assert b.committable() == {("facts", 0): 2}

    batch = b.take()
    assert batch is not None and [o.offset for o in batch.origins] == [2, 3]
    assert batch.offsets == {("facts", 0): 4}  # what becomes committable once it is durable
    assert b.to_commit() == {("facts", 0): 2}  # in flight: nothing new yet
    b.mark_committed({("facts", 0): 2})
    b.complete(batch)
    assert b.to_commit() == {("facts", 0): 4}  # offset 4 is still pending
    b.mark_committed({("facts", 0): 4})
    assert b.to_commit() == {}

    last = b.take()
    assert last is not None
    b.hold(at(5))
    b.release(at(5))
    b.complete(last)
    assert b.to_commit() == {("facts", 0): 6}


def test_offsets_are_per_partition() -> None:
    b = Batcher(batch_size=2, linger=5.0, clock=FakeClock())
    b.add(fact("a"), at(10, partition=0))
    b.add(fact("b"), at(20, partition=1))
    b.add(fact("c"), at(11, partition=0))
    batch = b.take()
    assert batch is not None
    b.complete(batch)
    assert b.committable() == {("facts", 0): 11, ("facts", 1): 21}
    assert b.to_commit(partitions={("facts", 1)}) == {("facts", 1): 21}


def test_revoked_partition_drops_its_pending_facts_and_offsets() -> None:
    b = Batcher(batch_size=2, linger=5.0, clock=FakeClock())
    b.add(fact("a"), at(0, partition=0))
    b.add(fact("b"), at(0, partition=1))
    in_flight = b.take()
    assert in_flight is not None
    b.add(fact("c"), at(1, partition=0))
    b.add(fact("d"), at(1, partition=1))
    b.hold(at(2, partition=1))

    assert b.revoke([("facts", 1)]) == 1
    assert b.pending == 1 and b.dropped == 1
    b.complete(in_flight)
    # Partition 1 belongs to another member now: nothing of it is committed here.
    assert b.committable() == {("facts", 0): 1}
    rest = b.take()
    assert rest is not None and [f.subject for f in rest] == ["c"]


def test_a_rewound_partition_commits_from_its_new_position() -> None:
    # An in-memory broker restarted empty hands out offsets from 0 again.
    b = Batcher(batch_size=1, linger=0.0, clock=FakeClock())
    b.add(fact("a"), at(41))
    batch = b.take()
    assert batch is not None
    b.complete(batch)
    b.mark_committed(b.to_commit())
    b.add(fact("b"), at(0))
    batch = b.take()
    assert batch is not None
    b.complete(batch)
    assert b.to_commit() == {("facts", 0): 1}


def test_fact_batch_is_a_sequence_and_drops_known_facts() -> None:
    facts = (fact("a"), fact("b"), fact("c"))
    batch = FactBatch(seq=7, facts=facts, origins=(at(0), at(1), at(2)), offsets={("facts", 0): 3})
    assert len(batch) == 3 and batch[1] is facts[1] and list(batch) == list(facts)
    rest = batch.without({facts[1].fact_id})
    assert [f.subject for f in rest] == ["a", "c"]
    assert [o.offset for o in rest.origins] == [0, 2]
    assert rest.seq == 7 and rest.offsets == batch.offsets


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        Batcher(batch_size=0, linger=1.0)
    with pytest.raises(ValueError):
        Batcher(batch_size=1, linger=-1.0)
