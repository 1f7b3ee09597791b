"""The update log without a broker: chunks reassemble to the exact payload or are refused, and
a replica's store that ingests the editor's payloads serves the editor's tensors bit for bit,
refusing any record that would serve something else."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

from editd.consumers.broker import ensure_topics
from editd.consumers.updates import (
    CURRENT,
    TOPIC_CONFIGS,
    VERSION,
    Assembler,
    LogRecord,
    Refusal,
    UpdateLogPublisher,
    UpdateLogReader,
    messages,
)
from editd.store.store import EditStore, UpdateRefused
from editd.store.wire import (
    UpdateLogSource,
    WireError,
    decode_current,
    decode_version,
    encode_version,
)
from tests.test_store_versions import base_of, commit_n, make_facts, make_update, tiny_llama


def feed_all(assembler: Assembler, msgs, first_offset: int = 0) -> list:
    out = []
    for i, (_key, value, headers) in enumerate(msgs):
        got = assembler.feed(first_offset + i, value, headers)
        if got is not None:
            out.append(got)
    return out


def test_a_payload_split_into_chunks_reassembles_exactly():
    payload = bytes(range(256)) * 41  # 10,496 bytes
    msgs = messages(VERSION, 7, payload, chunk_bytes=1000)
    assert len(msgs) == 11
    assert all(len(value) <= 1000 for _, value, _ in msgs)
    [record] = feed_all(Assembler(), msgs, first_offset=40)
    assert isinstance(record, LogRecord)
    assert (record.kind, record.version, record.payload) == (VERSION, 7, payload)
    assert (record.first_offset, record.next_offset) == (40, 51)


def test_a_corrupted_chunk_is_refused_by_checksum():
    payload = b"x" * 5000
    msgs = messages(VERSION, 3, payload, chunk_bytes=1024)
    key, value, headers = msgs[2]
    msgs[2] = (key, value[:-1] + b"y", headers)
    [refused] = feed_all(Assembler(), msgs)
    assert isinstance(refused, Refusal)
    assert refused.version == 3 and "checksum" in refused.why


def test_missing_and_foreign_chunks_are_refused_and_the_next_record_still_reads():
    a = Assembler()
    first = messages(VERSION, 4, b"a" * 3000, chunk_bytes=1000)
    second = messages(CURRENT, 4, b'{"x": 1}', chunk_bytes=1000)
    got = feed_all(a, [first[0], first[2]])  # chunk 1 lost
    assert len(got) == 1 and isinstance(got[0], Refusal) and "out of order" in got[0].why
    assert a.feed(10, b"hello", [("kind", b"version")]).why.startswith("not an update-log")
    [ok] = feed_all(a, second, first_offset=11)
    assert isinstance(ok, LogRecord) and ok.kind == CURRENT


def _editor_and_replica(tmp_path, n: int):
    base = base_of(tiny_llama(torch.float32))
    editor = EditStore(tmp_path / "editor")
    editor.create(base)
    commit_n(editor, base, n)
    replica = EditStore(tmp_path / "replica")
    replica.create(base)
    return base, editor, replica


def _ship(source: UpdateLogSource, replica: EditStore, previous: int | None) -> list[int]:
    """What a replica does with one publication: every version it lacks, then the current."""
    target = source.current()
    for v in source.lineage(target)[1:]:
        record, factors, base_sha = decode_version(source.version_payload(v))
        replica.ingest(record, factors, base_sha)
    current = decode_current(source.current_payload(target, previous))
    assert list(current.lineage) == replica.lineage(target)
    return replica.follow(current.version, current.reason, current.at)


def test_a_replica_store_serves_the_editors_tensors_and_its_rollbacks(tmp_path):
    _, editor, replica = _editor_and_replica(tmp_path, 5)
    source = UpdateLogSource(editor)
    assert _ship(source, replica, None) == []
    assert replica.current == 5
    assert replica.expected_sha256() == editor.expected_sha256()
    assert replica.verify() == []  # rebuilt from the replica's own disk
    # Ingesting again is a no-op: a republished version is recognised.
    record, factors, base_sha = decode_version(source.version_payload(3))
    assert replica.ingest(record, factors, base_sha) is False

    editor.rollback(2, "canary fell")
    undone = _ship(source, replica, previous=5)
    assert undone == [3, 4, 5]
    assert replica.current == 2 and replica.expected_sha256() == editor.expected_sha256()
    assert replica.version(4).undone.reason == "canary fell"
    assert replica.verify() == []

    # A new version after the rollback builds on 2 under the editor's number.
    base = editor.base()
    editor.commit(make_update(base, seed=9), make_facts(6), {"facts/0": 60})
    assert _ship(source, replica, previous=2) == []
    assert replica.current == editor.current == 6
    assert replica.lineage() == editor.lineage() == [0, 1, 2, 6]
    reopened = EditStore(tmp_path / "replica", readonly=True)
    reopened.open()
    assert reopened.current == 6 and reopened.verify() == []


@pytest.mark.parametrize("form", ["low-rank", "dense"])
def test_a_replica_follows_a_consolidation_and_a_rollback_past_it(tmp_path, form):
    from editd.lowrank import EditUpdate, LayerUpdate, lowrank_product

    _, editor, replica = _editor_and_replica(tmp_path, 3)
    source = UpdateLogSource(editor)
    _ship(source, replica, None)
    # What `Editor.consolidate` commits: per module the joint solve's factors (or its dense
    # product times an identity), replacing the accumulated update; no keys, no facts.
    g = torch.Generator().manual_seed(4)
    layers = {}
    for name, w in editor.base().items():
        d_out, d_in = w.shape
        left, right = torch.randn(d_out, 5, generator=g), torch.randn(5, d_in, generator=g)
        if form == "dense":
            full = left @ right
            eye = torch.eye(min(d_out, d_in))
            left, right = (eye, full) if d_out <= d_in else (full, eye)
        layers[name] = LayerUpdate(
            left=left * 0.01, right=right, keys=torch.zeros(d_in, 0), replaces=True
        )
    editor.commit(EditUpdate(layers=layers), [], {}, diagnostics={"consolidated": {}})
    assert _ship(source, replica, previous=3) == []
    assert replica.current == 4 and replica.version(4).consolidated
    assert replica.expected_sha256() == editor.expected_sha256() and replica.verify() == []
    for name, layer in layers.items():
        assert torch.equal(replica.deltas()[name], lowrank_product(layer.left, layer.right))
    editor.rollback(3, "canary fell")
    assert _ship(source, replica, previous=4) == [4]
    assert replica.expected_sha256() == editor.expected_sha256(3) and replica.verify() == []


def test_a_republished_version_carries_the_same_record_and_factors(tmp_path):
    _, editor, _ = _editor_and_replica(tmp_path, 2)
    source = UpdateLogSource(editor)
    record, factors, _ = decode_version(source.version_payload(2))
    editor.record_scores(2, {"s": 0.9})  # scores change after publication, on the editor only
    again, factors_again, _ = decode_version(source.version_payload(2))
    assert again == record and again.scores is None
    assert factors.keys() == factors_again.keys()
    assert all(torch.equal(factors[k], factors_again[k]) for k in factors)


def test_records_that_would_serve_other_weights_are_refused(tmp_path):
    _, editor, replica = _editor_and_replica(tmp_path, 3)
    source = UpdateLogSource(editor)
    record, factors, base_sha = decode_version(source.version_payload(1))

    # A payload whose checksum is fine but whose factors were altered before publishing.
    tampered = dict(factors)
    name = sorted(record.modules)[0]
    tampered[f"{name}.left"] = tampered[f"{name}.left"].clone()
    tampered[f"{name}.left"][0, 0] += 1e-3
    forged = decode_version(encode_version(record, tampered, base_sha))
    with pytest.raises(UpdateRefused, match="does not rebuild to the sha256"):
        replica.ingest(*forged)

    # A version whose parent never arrived.
    r2, f2, b2 = decode_version(source.version_payload(2))
    with pytest.raises(UpdateRefused, match="never arrived"):
        replica.ingest(r2, f2, b2)

    # Another base model.
    other = {n: t + 1 for n, t in replica.base().items()}
    wrong_base = {n: hashlib.sha256(t.numpy().tobytes()).hexdigest() for n, t in other.items()}
    with pytest.raises(UpdateRefused, match="another base model"):
        replica.ingest(record, factors, wrong_base)

    # Not a payload at all.
    with pytest.raises(WireError):
        decode_version(b"\x00" * 32)

    assert replica.current == 0 and not replica.has(1)  # nothing was kept
    assert replica.ingest(record, factors, base_sha) is True
    with pytest.raises(UpdateRefused, match="never arrived"):
        replica.follow(3, None)


def _read_log(servers, topic: str, start: int = 0, timeout: float = 20.0) -> list[LogRecord]:
    reader = UpdateLogReader(servers, topic, start_offset=start)
    out: list[LogRecord] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            got = reader.poll(0.5)
            out += got
            if not got and reader.lag() == 0:
                break
    finally:
        reader.close()
    assert all(isinstance(r, LogRecord) for r in out), out
    return out


@pytest.mark.broker
def test_the_publisher_publishes_what_a_crash_or_a_stopped_store_left_unpublished(tmp_path, broker):
    servers = broker.bootstrap_servers
    topic = "updates-publisher"
    ensure_topics(servers, [topic], 1, configs=TOPIC_CONFIGS)
    base, editor, _ = _editor_and_replica(tmp_path, 3)
    state = tmp_path / "editor" / "update-log.json"

    def publisher() -> UpdateLogPublisher:  # a new process each time
        return UpdateLogPublisher(
            UpdateLogSource(editor), servers, topic, state_file=state, chunk_bytes=2048
        )

    first = publisher()
    assert first.publish_once()
    records = _read_log(servers, topic)
    assert [(r.kind, r.version) for r in records if r.kind == CURRENT] == [(CURRENT, 3)]
    assert sorted(r.version for r in records if r.kind == VERSION) == [1, 2, 3]
    end = records[-1].next_offset

    # Two versions committed while nothing published them (the editor crashed before), then a
    # rollback of the stopped store: the next start publishes the versions the log lacks and
    # one current record for the final state, nothing it published before.
    editor.commit(make_update(base, seed=41), make_facts(4), {"facts/0": 40})
    editor.commit(make_update(base, seed=42), make_facts(5), {"facts/0": 50})
    editor.rollback(4, "operator: stopped store")
    assert publisher().publish_once()
    later = _read_log(servers, topic, start=end)
    assert sorted({r.version for r in later if r.kind == VERSION}) == [4]
    [current] = [decode_current(r.payload) for r in later if r.kind == CURRENT]
    assert (current.version, current.undone, current.reason) == (4, (), None)
    # The log's last word is what the store serves; publishing again adds nothing.
    assert publisher().publish_once()
    assert _read_log(servers, topic, start=later[-1].next_offset, timeout=3) == []

    # A log that lost records (a broker without its disk) is republished in full.
    lost = "updates-lost"
    ensure_topics(servers, [lost], 1, configs=TOPIC_CONFIGS)
    state.write_text(
        json.dumps({"topic": lost, "versions": [1, 2, 3, 4], "current": 4, "end_offset": 99})
    )
    pub = UpdateLogPublisher(UpdateLogSource(editor), servers, lost, state_file=state)
    assert pub.publish_once()
    rebuilt = _read_log(servers, lost)
    assert sorted(r.version for r in rebuilt if r.kind == VERSION) == [1, 2, 3, 4]
    assert [r.version for r in rebuilt if r.kind == CURRENT] == [4]
