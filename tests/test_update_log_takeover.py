"""Two editors on one update log, in process: every store has an id that its records carry, an
editor refuses another editor's log unless told to take it over, a takeover makes a replica's
store start again from the base and take the new editor's versions, and a running editor whose
log was taken over stops publishing. (tests/test_fleet_takeover.py runs the same with
separate `editd run` processes.)"""

from __future__ import annotations

import json

import pytest
import torch

from editd.consumers.broker import ensure_topics
from editd.consumers.updates import (
    CURRENT,
    TAKEOVER,
    TOPIC_CONFIGS,
    VERSION,
    UpdateLogPublisher,
    UpdateLogTaken,
    last_writer,
)
from editd.store import identity
from editd.store.store import EditStore, UpdateRefused
from editd.store.wire import UpdateLogSource, decode_current, decode_version
from tests.test_store_versions import base_of, make_facts, make_update, tiny_llama
from tests.test_update_log import _read_log


def commit_n(store: EditStore, base: dict[str, torch.Tensor], n: int, seed: int = 100) -> None:
    for k in range(n):
        v = store.current + 1
        store.commit(make_update(base, seed=seed + k), make_facts(v), {"facts/0": 10 * v})


def test_a_store_is_made_with_an_id_and_an_older_store_gets_one_durably(tmp_path):
    base = base_of(tiny_llama(torch.float32))
    store = EditStore(tmp_path / "s")
    store.create(base)
    made = store.store_id
    assert made and (tmp_path / "s" / identity.IDENTITY_FILE).is_file()
    store.close()
    with EditStore(tmp_path / "s") as again:
        again.open(base)
        assert again.store_id == made

    # A store from before ids: a reader does not write one, the next writer does, for good.
    (tmp_path / "s" / identity.IDENTITY_FILE).unlink()
    reader = EditStore(tmp_path / "s", readonly=True)
    reader.open()
    assert reader.store_id is None
    assert not (tmp_path / "s" / identity.IDENTITY_FILE).exists()
    with EditStore(tmp_path / "s") as writer:
        writer.open(base)
        given = writer.store_id
    assert given and given != made
    assert identity.read(tmp_path / "s") == given


def test_reset_to_base_lets_a_store_take_another_lineage_under_the_same_numbers(tmp_path):
    base = base_of(tiny_llama(torch.float32))
    old, new = EditStore(tmp_path / "old"), EditStore(tmp_path / "new")
    old.create(base)
    new.create(base)
    commit_n(old, base, 3)
    commit_n(new, base, 2, seed=500)
    assert old.expected_sha256(1) != new.expected_sha256(1)
    replica = EditStore(tmp_path / "replica")
    replica.create(base)
    for v in (1, 2, 3):
        replica.ingest(*decode_version(UpdateLogSource(old).version_payload(v)))
    replica.follow(3, None)
    record = decode_version(UpdateLogSource(new).version_payload(1))
    with pytest.raises(UpdateRefused, match="another editor"):
        replica.ingest(*record)

    assert replica.reset_to_base() == [1, 2, 3]
    assert replica.current == 0 and replica.versions()[-1].version == 0
    for v in (1, 2):
        assert replica.ingest(*decode_version(UpdateLogSource(new).version_payload(v)))
    replica.follow(2, None)
    assert replica.verify() == []
    assert replica.expected_sha256(2) == new.expected_sha256(2)
    replica.close()
    # What reopening finds: the new lineage only, nothing of the old one.
    again = EditStore(tmp_path / "replica")
    again.open(base)
    assert [v.version for v in again.versions()] == [0, 1, 2]
    assert again.verify() == [] and again.expected_sha256(2) == new.expected_sha256(2)
    assert not list((tmp_path / "replica" / "snapshots").glob("*"))


@pytest.mark.broker
def test_an_editor_refuses_another_editors_log_unless_told_to_take_it_over(tmp_path, broker):
    servers = broker.bootstrap_servers
    topic = "updates-takeover"
    ensure_topics(servers, [topic], 1, configs=TOPIC_CONFIGS)
    base = base_of(tiny_llama(torch.float32))
    first, second = EditStore(tmp_path / "first"), EditStore(tmp_path / "second")
    first.create(base)
    second.create(base)
    commit_n(first, base, 2)
    commit_n(second, base, 1, seed=700)
    assert first.store_id != second.store_id

    def publisher(store: EditStore, take_over: bool = False) -> UpdateLogPublisher:
        return UpdateLogPublisher(
            UpdateLogSource(store),
            servers,
            topic,
            state_file=store.root / "update-log.json",
            chunk_bytes=4096,
            editor_id=store.store_id,
            take_over=take_over,
        )

    assert last_writer(servers, topic) == (0, None)
    old = publisher(first)
    assert old.publish_once()
    records = _read_log(servers, topic)
    assert {r.editor for r in records} == {first.store_id}
    assert last_writer(servers, topic) == (records[-1].next_offset, first.store_id)

    # A recreated store (a lost disk) on the same log: refused, with what to do.
    with pytest.raises(UpdateLogTaken, match="--take-over-updates-log"):
        publisher(second).claim(timeout_s=20)
    assert last_writer(servers, topic)[0] == records[-1].next_offset  # nothing written

    new = publisher(second, take_over=True)
    assert new.publish_once()
    assert new.took_over_from == first.store_id
    later = _read_log(servers, topic, start=records[-1].next_offset)
    assert later[0].kind == TAKEOVER
    assert {r.editor for r in later} == {second.store_id}
    body = json.loads(later[0].payload)
    assert (body["editor"], body["previous"]) == (second.store_id, first.store_id)
    assert [r.version for r in later if r.kind == VERSION] == [1]
    [current] = [decode_current(r.payload) for r in later if r.kind == CURRENT]
    assert current.sha256 == second.expected_sha256(1)

    # Restarted with the flag still set, the new editor finds its own log: no second takeover.
    again = publisher(second, take_over=True)
    again.claim(timeout_s=20)
    assert again.took_over_from is None

    # The old editor, still running, learns from its next publication that the log was taken
    # over (what it sent lands after the new editor's records, which replicas follow).
    commit_n(first, base, 1, seed=900)
    with pytest.raises(UpdateLogTaken, match="taken over"):
        old.publish_once()
    stray = _read_log(servers, topic, start=later[-1].next_offset)
    assert stray and {r.editor for r in stray} == {first.store_id}
