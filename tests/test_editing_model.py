"""ModelHandle: loading, float32 delta application, exact restore, dtypes, the read/write lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from editing_support import tiny_llama_dir
from test_monitoring_evaluator import wait_for

from editd.editing.model import ModelHandle, ReadWriteLock, default_layers
from editd.lowrank import tensor_sha256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"), layers=4)


def test_load_reads_geometry_from_the_checkpoint(model_dir: Path) -> None:
    h = ModelHandle.load(model_dir, device="cpu")
    assert h.device == torch.device("cpu") and h.dtype == torch.float32
    assert h.num_layers == 4 and h.module_name(2) == "model.layers.2.mlp.down_proj"
    assert h.weight("model.layers.2.mlp.down_proj.weight").shape == (64, 256)
    assert not any(p.requires_grad for p in h.model.parameters())
    assert h.identity == ModelHandle.load(model_dir, device="cpu").identity


def test_default_layers_follow_depth() -> None:
    assert default_layers(32) == [4, 5, 6, 7, 8]
    assert default_layers(28) == [4, 5, 6, 7]
    assert default_layers(6) == [1, 2]
    assert default_layers(8) == [1, 2, 3]
    assert default_layers(2) == [0, 1]


def test_set_deltas_accumulates_in_float32_and_restores_exactly(model_dir: Path) -> None:
    h = ModelHandle.load(model_dir, device="cpu", dtype="bfloat16")
    names = [h.module_name(1), h.module_name(2)]
    base_sha = h.weight_sha256(names)
    base = {n: h.weight(n).clone() for n in names}
    g = torch.Generator().manual_seed(0)
    d1 = {n: 1e-3 * torch.randn(h.weight(n).shape, generator=g) for n in names}
    d2 = {n: d1[n] + 1e-3 * torch.randn(h.weight(n).shape, generator=g) for n in names}

    h.set_deltas(d1)
    v1 = h.weight_sha256(names)
    for n in names:
        want = (base[n].float() + d1[n]).to(torch.bfloat16)
        assert torch.equal(h.weight(n), want)
    h.set_deltas(d2)
    assert h.weight_sha256(names) != v1
    h.set_deltas(d1)  # back to version 1: the same bytes, not merely close
    assert h.weight_sha256(names) == v1
    h.set_deltas({names[0]: d1[names[0]]})  # names[1] is no longer edited: back to base
    assert h.weight_sha256([names[1]]) == {names[1]: base_sha[names[1]]}
    h.reset()
    assert h.weight_sha256(names) == base_sha
    untouched = h.module_name(3)
    assert tensor_sha256(h.weight(untouched)) == h.weight_sha256([untouched])[untouched]


def test_set_deltas_rejects_a_wrong_shape(model_dir: Path) -> None:
    h = ModelHandle.load(model_dir, device="cpu")
    with pytest.raises(ValueError, match="shape"):
        h.set_deltas({h.module_name(1): torch.zeros(3, 3)})


def test_sha256_distinguishes_dtypes_of_equal_values() -> None:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_sha256(x) != tensor_sha256(x.to(torch.bfloat16))
    assert tensor_sha256(x) == tensor_sha256(x.T.contiguous().T)


def test_writer_waits_for_readers_and_blocks_new_ones() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def long_reader() -> None:
        with lock.reading():
            events.append("r1 in")
            reader_in.set()
            release_reader.wait(10)
            events.append("r1 out")

    def writer() -> None:
        with lock.writing():
            events.append("w")

    def late_reader() -> None:
        with lock.reading():
            events.append("r2")

    t1 = threading.Thread(target=long_reader)
    t1.start()
    reader_in.wait(10)
    tw = threading.Thread(target=writer)
    tw.start()
    wait_for(lambda: lock._writers_waiting == 1)
    t2 = threading.Thread(target=late_reader)
    t2.start()
    # Both blocked inside the lock's condition (CPython's Condition keeps its waiters there).
    wait_for(lambda: len(lock._cond._waiters) == 2)
    assert events == ["r1 in"]  # neither the writer nor the late reader got in
    release_reader.set()
    for t in (t1, tw, t2):
        t.join(10)
    assert events == ["r1 in", "r1 out", "w", "r2"]


def test_requests_see_all_of_a_swap_or_none(model_dir: Path) -> None:
    h = ModelHandle.load(model_dir, device="cpu")
    names = [h.module_name(i) for i in range(4)]
    shapes = {n: h.weight(n).shape for n in names}
    stop = threading.Event()
    mixed: list[set[bool]] = []

    def reader() -> None:
        while not stop.is_set():
            with h.reading():
                # Each swap sets every edited weight to base + 1 or back to base.
                edited = {bool((h.weight(n) != h.base.get(n, h.weight(n))).any()) for n in names}
            if len(edited) > 1:
                mixed.append(edited)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(30):
        h.set_deltas({n: torch.ones(shapes[n]) for n in names} if i % 2 == 0 else {})
    stop.set()
    for t in threads:
        t.join(10)
    assert not mixed


def test_base_view_shows_this_thread_the_base_model_while_edits_are_served(
    model_dir: Path,
) -> None:
    import threading

    h = ModelHandle.load(model_dir, device="cpu")
    name = h.module_name(h.default_layers()[0])
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        base_logits = h.model(input_ids=ids).logits
        h.set_deltas({name: torch.randn(h.weight(name).shape) * 0.5})
        edited = h.model(input_ids=ids).logits
        assert not torch.allclose(edited, base_logits)
        seen_elsewhere: list[torch.Tensor] = []
        with h.reading(), h.base_view():
            viewed = h.model(input_ids=ids).logits
            other = threading.Thread(
                target=lambda: seen_elsewhere.append(h.model(input_ids=ids).logits)
            )
            other.start()
            other.join()
    torch.testing.assert_close(viewed, base_logits, rtol=1e-5, atol=1e-5)
    # Another thread (a request being served) still sees the edited weights.
    torch.testing.assert_close(seen_elsewhere[0], edited)
