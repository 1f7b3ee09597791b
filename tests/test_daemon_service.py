"""`EditService` in process, on a real versioned model (tiny random Llama, real editor, real
store): what the daemon does when a batch runs out of memory, poisons the editor, or races a
rollback, and what reaches the rejected topic."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from editing_support import CORPUS, tiny_llama_dir

from editd.config import Settings
from editd.daemon.errors import Conflict, FatalError, NotFound, Unavailable
from editd.daemon.service import DeviceError, EditService, is_device_error
from editd.editing.editor import Editor, EditorConfig
from editd.editing.errors import NonFiniteUpdate
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus
from editd.editing.targets import TargetConfig
from editd.monitoring.metrics import Metrics
from editd.store.outbox import HEADERS
from editd.versions import VersionedModel
from editd.world.requests import make_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FlakyEditor(Editor):
    """The real editor, failing the way devices and facts fail, on demand."""

    oom_above: int | None = None  # batches larger than this run out of memory
    poison: str | None = None  # a batch holding this fact id fails as a bad edit
    device_error: bool = False
    bug: Exception | None = None  # raised from inside the edit, as a bug in it would be
    sizes: list[int]

    def compute_update(self, batch):  # type: ignore[override]
        self.sizes.append(len(batch))
        if self.device_error:
            raise RuntimeError("CUDA error: device-side assert triggered")
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison is not None and any(f.fact_id == self.poison for f in batch):
            raise NonFiniteUpdate("target optimisation produced NaN")
        if self.bug is not None:
            raise self.bug
        return super().compute_update(batch)

    def consolidate(self, keys, targets, current):  # type: ignore[override]
        if self.poison == "consolidate":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return super().consolidate(keys, targets, current)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def _service(model_dir: Path, data_dir: Path, servers: list[str]) -> EditService:
    handle = ModelHandle.load(model_dir, device="cpu")
    config = EditorConfig(layers=(1,), targets=TargetConfig(steps=5))
    editor = FlakyEditor(
        handle, config, corpus=Corpus(texts=CORPUS), cache_dir=data_dir / "c0", progress=False
    )
    editor.sizes = []
    model = VersionedModel.open(handle, data_dir / "store", editor=editor)
    return EditService(Settings(), model, Metrics(), bootstrap_servers=servers)


@pytest.fixture()
def service(model_dir: Path, tmp_path: Path) -> Iterator[EditService]:
    # Nothing listens there: these tests read the outbox, not the topic.
    svc = _service(model_dir, tmp_path, ["127.0.0.1:9"])
    yield svc
    svc.model.close()


def _consolidations(service: EditService, trigger: str, outcome: str) -> float | None:
    labels = {"trigger": trigger, "outcome": outcome}
    return service.metrics.registry.get_sample_value("editd_consolidations_total", labels)


def _versions(service: EditService) -> list[tuple[int, int]]:
    return [(v["version"], v["facts"]) for v in service.versions() if v["version"] > 0]


def test_a_batch_out_of_memory_is_split_until_it_fits(service: EditService) -> None:
    editor = service.editor
    assert isinstance(editor, FlakyEditor)
    editor.oom_above = 2
    facts = make_requests(5, seed=3)
    service.apply_batch(facts)
    assert editor.sizes == [5, 2, 3, 1, 2]  # 5 → 2 + 3, 3 → 1 + 2
    assert _versions(service) == [(1, 2), (2, 1), (3, 2)]
    assert service.model.applied_fact_ids() == {f.fact_id for f in facts}
    assert service.model.served_sha256() == service.model.store.expected_sha256()
    assert service.is_ready()


def test_out_of_memory_on_one_fact_is_fatal_and_rejects_nothing(service: EditService) -> None:
    editor = service.editor
    assert isinstance(editor, FlakyEditor)
    editor.oom_above = 0
    with pytest.raises(DeviceError, match="single fact"):
        service.apply_batch(make_requests(2, seed=4))
    assert not service.is_ready()
    assert service.status()["fatal"]
    assert service.model.store.outbox.pending() == []  # the facts are fine: replayed, not lost
    assert _versions(service) == []


def test_a_device_error_is_fatal_not_a_poison_batch(service: EditService) -> None:
    editor = service.editor
    assert isinstance(editor, FlakyEditor)
    editor.device_error = True
    with pytest.raises(FatalError):
        service.apply_batch(make_requests(3, seed=5))
    assert service.model.store.outbox.pending() == []
    assert not service.is_ready()
    assert is_device_error(torch.OutOfMemoryError("x"))
    assert not is_device_error(ValueError("target optimisation produced NaN"))


def test_device_errors_are_told_by_type_and_by_text_only_where_torch_has_no_type() -> None:
    if hasattr(torch, "AcceleratorError"):  # torch ≥ 2.8
        assert is_device_error(torch.AcceleratorError("an illegal memory access"))
    # cuBLAS failures are plain RuntimeErrors even in torch 2.13.
    assert is_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling gemm"))
    assert not is_device_error(ValueError("the prompt quotes 'CUDA error' and is fine"))
    assert not is_device_error(torch.linalg.LinAlgError("not positive-definite"))
    assert not is_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


BUGS = [
    TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'"),
    IndexError("index 7 is out of bounds for dimension 0 with size 3"),
    torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x64 and 32x64)"),
]


@pytest.mark.parametrize("bug", BUGS, ids=lambda e: type(e).__name__)
def test_a_bug_inside_an_edit_rejects_nothing_and_the_next_run_applies_the_batch(
    model_dir: Path, tmp_path: Path, bug: Exception
) -> None:
    facts = make_requests(3, seed=8)
    first = _service(model_dir, tmp_path, ["127.0.0.1:9"])
    try:
        editor = first.editor
        assert isinstance(editor, FlakyEditor)
        editor.bug = bug
        with pytest.raises(type(bug)) as raised:
            first.apply_batch(facts)
        assert raised.value is bug  # propagated as it is: the consumer does not commit
        assert first.model.store.outbox.pending() == []
        assert first.metrics.registry.get_sample_value("editd_facts_rejected_total") == 0
        assert _versions(first) == []
        # Not fatal (the served model was only read): the daemon exits EXIT_FAILURE, not 7.
        assert first.fatal is None and first.is_ready()
    finally:
        first.model.close()
    # The restart: the same data dir, the batch delivered again, and this time it is edited.
    second = _service(model_dir, tmp_path, ["127.0.0.1:9"])
    try:
        assert second.known_fact_ids([f.fact_id for f in facts]) == set()
        second.apply_batch(facts)
        assert _versions(second) == [(1, 3)]
        assert second.model.store.outbox.pending() == []
    finally:
        second.model.close()


def test_a_refused_update_goes_to_the_outbox(service: EditService) -> None:
    # The real editor's own refusal: an update larger than a (tiny) limit × the weight. Every
    # part is refused too, so the batch ends in the outbox fact by fact, and nothing is served.
    editor = service.editor
    editor.config = dataclasses.replace(editor.config, max_update_ratio=1e-9)
    facts = make_requests(2, seed=9)
    service.apply_batch(facts)  # returns: the consumer may commit past it
    records = service.model.store.outbox.pending()
    assert all(r.kind == "edit_failed" and r.version is None for r in records)
    assert [f["id"] for r in records for f in r.facts] == [f.fact_id for f in facts]
    assert all("max_update_ratio" in r.reason for r in records)
    assert _versions(service) == [] and service.is_ready()


def test_a_poison_fact_goes_to_the_outbox_and_the_facts_beside_it_are_applied(
    service: EditService,
) -> None:
    editor = service.editor
    assert isinstance(editor, FlakyEditor)
    poisoned = make_requests(3, seed=6)
    editor.poison = poisoned[1].fact_id
    service.apply_batch(poisoned)  # returns: the consumer may commit past it
    # Refused whole, then halved until the refusal is one fact's: 3 → 1 + 2, 2 → 1 + 1.
    assert editor.sizes == [3, 1, 2, 1, 1]
    [record] = service.model.store.outbox.pending()
    assert record.kind == "edit_failed" and record.version is None
    assert [f["id"] for f in record.facts] == [poisoned[1].fact_id]
    assert "NaN" in record.reason
    assert _versions(service) == [(1, 1), (2, 1)]
    assert service.model.applied_fact_ids() == {poisoned[0].fact_id, poisoned[2].fact_id}
    assert service.model.served_sha256() == service.model.store.expected_sha256()
    assert service.metrics.registry.get_sample_value("editd_facts_rejected_total") == 1
    # Delivered again after a crash before the commit: nothing is edited twice.
    service.apply_batch(poisoned)
    assert _versions(service) == [(1, 1), (2, 1)]
    editor.poison = None
    good = make_requests(2, seed=7)
    service.apply_batch(good)
    assert _versions(service) == [(1, 1), (2, 1), (3, 2)]
    assert service.is_ready()


def test_two_rollbacks_racing_leave_one_consistent_version(service: EditService) -> None:
    for seed in range(3):
        service.apply_batch(make_requests(1, seed=20 + seed))
    assert service.current_version() == 3
    results: dict[int, object] = {}
    go = threading.Barrier(2)

    def roll(to: int) -> None:
        go.wait()
        try:
            results[to] = service.rollback(to, f"race to {to}")
        except (Conflict, NotFound) as exc:
            # The loser is told to retry, or runs second and finds its target undone.
            results[to] = exc

    threads = [threading.Thread(target=roll, args=(v,)) for v in (2, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2
    current = service.current_version()
    assert current in (1, 2)
    # Whatever the order, the served weights are exactly the live version's.
    assert service.model.served_sha256() == service.model.store.expected_sha256(current)
    live = {v["version"] for v in service.versions() if v["state"] == "committed"}
    assert live == set(range(current + 1))
    undone = {r.version for r in service.model.store.outbox.pending()}
    assert undone == {3, 2} - live


@pytest.mark.broker
def test_rollback_and_poison_reach_the_rejected_topic_with_one_header_set(
    model_dir: Path, tmp_path: Path, broker
) -> None:
    from kafka_support import read_topic

    from editd.consumers.broker import ensure_topics

    servers = broker.bootstrap_servers
    settings = Settings()
    ensure_topics(servers, [settings.kafka.rejected], 1)
    service = _service(model_dir, tmp_path, servers)
    editor = service.editor
    assert isinstance(editor, FlakyEditor)
    try:
        service.start()
        applied = make_requests(2, seed=30)
        service.apply_batch(applied)
        poisoned = make_requests(1, seed=31)
        editor.poison = poisoned[0].fact_id
        service.apply_batch(poisoned)
        service.rollback(0, "bad batch")
        records = read_topic(servers, settings.kafka.rejected, 3, settle_ms=500)
        assert len(records) == 3
        for r in records:
            assert [h for h, _ in r.headers] == list(HEADERS)
        by_id = {dict(r.headers)["fact_id"].decode(): dict(r.headers) for r in records}
        assert by_id[poisoned[0].fact_id]["kind"] == b"edit_failed"
        assert by_id[poisoned[0].fact_id]["version"] == b"none"
        for fact in applied:
            headers = by_id[fact.fact_id]
            assert headers["kind"] == b"rolled_back"
            assert headers["version"] == b"1" and headers["rolled_back_to"] == b"0"
            assert headers["reason"] == b"operator: bad batch"
        values = {json.loads(r.value)["id"] for r in records}
        assert values == {f.fact_id for f in [*applied, *poisoned]}
        # Published means gone from the outbox (polled: the publisher acknowledges first).
        for _ in range(100):
            if not service.model.store.outbox.pending():
                break
            threading.Event().wait(0.05)
        assert service.model.store.outbox.pending() == []
    finally:
        service.stop()
        service.model.close()


def test_a_consolidation_runs_every_n_facts_and_one_rolled_back_waits_for_n_more(
    service: EditService,
) -> None:
    editor = service.editor
    editor.config = dataclasses.replace(editor.config, consolidate_every=4)
    for seed in (10, 11):
        service.apply_batch(make_requests(2, seed=seed))
    # Four facts since the base: version 3 re-solves them, and holds none of its own.
    assert _versions(service) == [(1, 2), (2, 2), (3, 0)]
    assert service.model.version(3).consolidated
    assert service.model.facts_since_consolidation() == 0
    assert service.model.served_sha256() == service.model.store.expected_sha256(3)
    assert len(service.model.applied_fact_ids()) == 4
    # The evaluator judged it worse: back to the sequential update, nothing rejected.
    service.policy_rollback(2, "policy: canary")
    assert service.model.store.outbox.pending() == []
    service.apply_batch(make_requests(2, seed=12))
    assert [v for v, _ in _versions(service)][-1] == 4  # not re-solved after two facts
    service.apply_batch(make_requests(2, seed=13))
    assert _versions(service)[-2:] == [(5, 2), (6, 0)]
    assert _consolidations(service, "schedule", "applied") == 2


def test_an_operator_consolidation_needs_live_facts_and_is_refused_on_a_busy_model(
    service: EditService,
) -> None:
    with pytest.raises(Conflict, match="no live facts"):
        service.consolidate()
    service.apply_batch(make_requests(2, seed=14))
    done = service.consolidate()
    assert done["version"] == 2 and done["facts_since"] == 2
    assert service.model.facts_since_consolidation() == 0
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with service.model.changing():
            held.set()
            release.wait(30)

    # A consolidation that runs out of memory leaves the sequential version served.
    service.apply_batch(make_requests(2, seed=15))
    service.editor.poison = "consolidate"
    with pytest.raises(Unavailable, match="still served"):
        service.consolidate()
    assert service.model.current == 3 and service.is_ready()
    assert _consolidations(service, "operator", "failed") == 1
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(Conflict, match="in progress"):
            service.consolidate()
    finally:
        release.set()
        holder.join(30)


def test_an_exact_re_solve_keeps_what_each_fact_realised_and_a_soft_one_shrinks_it(
    service: EditService,
) -> None:
    editor = service.editor
    for seed in (16, 17):
        service.apply_batch(make_requests(2, seed=seed))

    def left_unrealised(eps: float) -> list[float]:
        editor.config = dataclasses.replace(editor.config, consolidate_eps=eps)
        version = service.consolidate()["version"]
        per_layer = service.model.version(version).diagnostics["consolidated"]
        service.model.rollback(2, "test: next ε")
        return [layer["resid_rel_after"] for layer in per_layer.values()]

    exact = max(left_unrealised(0.0))
    # The tiny model's KᵀC⁻¹K is large beside ε 0.1 (SmolLM2's at λ 15,000 is not: there the
    # soft re-solve left 15-22 % of the realised targets unrealised at 200 facts).
    soft = min(left_unrealised(0.1))
    assert exact < 1e-9 and soft > 100 * exact


@pytest.mark.broker
def test_a_bug_stops_the_consumer_uncommitted_and_the_restart_applies_the_batch(
    model_dir: Path, tmp_path: Path, broker
) -> None:
    import time
    import uuid

    from kafka_support import committed

    from editd.config import FactLimits, KafkaSettings
    from editd.consumers.broker import ensure_topics
    from editd.consumers.consumer import Backoff, BatchFailed, FactConsumer
    from editd.consumers.publish import publish_facts

    servers = broker.bootstrap_servers
    topic = f"facts-{uuid.uuid4().hex[:10]}"
    ensure_topics(servers, [topic, f"{topic}.dlq"], replication_factor=1)
    facts = make_requests(3, seed=40)
    publish_facts(facts, servers, topic)
    kafka = KafkaSettings(
        topic=topic,
        group_id=f"group-{topic}",
        batch_size=3,
        linger_seconds=0.5,
        session_timeout_ms=4000,  # Tansu joins a group after about half of it
    )

    def consumer(service: EditService) -> FactConsumer:
        return FactConsumer(
            kafka,
            FactLimits(),
            service.apply_batch,
            service.known_fact_ids,
            bootstrap_servers=servers,
            backoff=Backoff(initial=0.2, maximum=2.0),
        )

    first = _service(model_dir, tmp_path, servers)
    try:
        editor = first.editor
        assert isinstance(editor, FlakyEditor)
        editor.bug = IndexError("index 7 is out of bounds for dimension 0 with size 3")
        with pytest.raises(BatchFailed, match="IndexError"):
            consumer(first).run()
        # What `editd run` exits with on a BatchFailed that is not fatal: EXIT_FAILURE.
        assert first.fatal is None and first.disk_full is None
        assert first.model.store.outbox.pending() == []
        assert committed(servers, kafka.group_id, topic) in (None, 0)
    finally:
        first.model.close()

    second = _service(model_dir, tmp_path, servers)
    again = consumer(second)
    thread = threading.Thread(target=again.run, name="fact-consumer")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while committed(servers, kafka.group_id, topic) != 3:
            assert time.monotonic() < deadline, f"not committed; stats: {again.stats}"
            threading.Event().wait(0.1)
        assert second.model.applied_fact_ids() == {f.fact_id for f in facts}
        assert second.model.store.outbox.pending() == []
    finally:
        again.stop()
        thread.join(30)
        second.model.close()
