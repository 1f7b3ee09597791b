"""The edit store on the down_proj weights of a real (tiny, random) torch Llama: versions,
exact rollback, snapshots, recovery state. Crash safety is in test_store_crash.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from editd.lowrank import EditUpdate, LayerUpdate, lowrank_product, served_weight, tensor_sha256
from editd.store.store import EditStore, StoreError, StoreLocked, StoreMismatch, VersionNotFound
from editd.store.version import VersionState

EDITED = [1, 2]
RANK = 3


def tiny_llama(dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)


def module_names() -> list[str]:
    return [f"model.layers.{i}.mlp.down_proj" for i in EDITED]


def base_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in module_names()}


def make_update(base: dict[str, torch.Tensor], seed: int, names: list[str] | None = None):
    """A low-rank update of the size a batch of RANK facts gives, large enough to move bf16."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names or sorted(base):
        d_out, d_in = base[name].shape
        left = torch.randn(d_out, RANK, generator=g) * 0.05
        right = torch.randn(RANK, d_in, generator=g) * 0.05
        keys = torch.randn(d_in, RANK, generator=g)
        layers[name] = LayerUpdate(left=left, right=right, keys=keys)
    return EditUpdate(layers=layers, diagnostics={"residual": torch.tensor(0.25), "nan": 1e400})


def make_facts(version: int, n: int = 2) -> list[dict]:
    return [
        {
            "id": f"f-{version}-{i}",
            "subject": f"Subject {version}.{i}",
            "prompt": "The capital of {} is",
            "target_new": f"City{version}{i}",
        }
        for i in range(n)
    ]


def commit_n(store: EditStore, base: dict[str, torch.Tensor], n: int) -> dict[int, dict]:
    """Commit n versions; return each version's sha256 as computed right after its commit."""
    seen = {}
    for k in range(n):
        v = store.current + 1
        names = None if k % 3 else sorted(base)[:1]  # some versions edit only one module
        store.commit(
            make_update(base, seed=100 + k, names=names),
            make_facts(v),
            {"facts/0": 10 * v, ("facts", 1): 5 * v},
            timings={"solve": 0.01 * v},
            diagnostics={"batch": v},
        )
        seen[store.current] = {n: tensor_sha256(t) for n, t in store.served().items()}
    return seen


def delta_sha(deltas: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: tensor_sha256(d) for n, d in deltas.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_seven_versions_roll_back_to_three_then_base(tmp_path, dtype):
    model = tiny_llama(dtype)
    base = base_of(model)
    base_sha = {n: tensor_sha256(t) for n, t in base.items()}
    with EditStore(tmp_path, snapshot_every=3) as store:
        assert store.open_or_create(base) is True
        assert store.expected_sha256(0) == base_sha
        seen = commit_n(store, base, 7)
        assert store.current == 7
        for v in range(1, 8):
            assert store.expected_sha256(v) == seen[v]
        assert len({json.dumps(s, sort_keys=True) for s in seen.values()}) == 7

        # Serve version 7 in the real module, the way ModelHandle.set_deltas does.
        for name, delta in store.deltas().items():
            w = model.get_submodule(name).weight
            w.copy_(served_weight(base[name], delta))
        live = {n: tensor_sha256(model.get_submodule(n).weight) for n in module_names()}
        assert live == store.expected_sha256(7)

        undone = store.rollback(3, "test: scores fell")
        ids = [f["id"] for r in undone for f in r.facts]
        assert ids == [f"f-{v}-{i}" for v in (4, 5, 6, 7) for i in (0, 1)]
        assert store.current == 3
        served = store.served()
        assert {n: tensor_sha256(t) for n, t in served.items()} == store.expected_sha256(3)
        assert store.expected_sha256(3) == seen[3]
        assert store.verify(3) == []

        assert sum(len(r.facts) for r in store.rollback(0, "test: back to base")) == 6
        assert store.deltas() == {}
        assert {n: tensor_sha256(t) for n, t in store.served().items()} == base_sha
        for name, t in store.served().items():
            assert torch.equal(t.view(torch.uint8), base[name].view(torch.uint8))

        states = {
            i["version"]: (i["state"], i["undone_reason"], i["current"]) for i in store.listing()
        }
        assert states[0] == ("committed", None, True)
        assert states[3] == ("undone", "test: back to base", False)
        assert states[7] == ("undone", "test: scores fell", False)
        assert set(states) == set(range(8))


def test_snapshots_give_the_same_bits_as_replay_from_base(tmp_path):
    base = base_of(tiny_llama(torch.bfloat16))
    with EditStore(tmp_path, snapshot_every=2) as store:
        store.create(base)
        commit_n(store, base, 7)
        snaps = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
        assert snaps == ["000002.safetensors", "000004.safetensors", "000006.safetensors"]
        for v in range(8):
            assert delta_sha(store.deltas(v)) == delta_sha(store.deltas(v, use_snapshots=False))
        head = delta_sha(store.deltas())
    # A fresh process has no cached head: version 7 comes from snapshot 6 plus one product.
    with EditStore(tmp_path, snapshot_every=2) as store:
        store.open(base)
        assert delta_sha(store.deltas()) == head
        assert store.verify() == []


def test_a_replacing_version_serves_its_own_product_and_a_rollback_past_it_is_exact(tmp_path):
    # What a consolidation commits: per module factors whose product is the whole update.
    base = base_of(tiny_llama(torch.bfloat16))
    names = sorted(base)
    with EditStore(tmp_path, snapshot_every=2) as store:
        store.create(base)
        seen = commit_n(store, base, 3)
        joint = make_update(base, seed=9, names=names[:1])  # the other module keeps adding up
        layers = {n: dataclasses.replace(u, replaces=True) for n, u in joint.layers.items()}
        v4 = store.commit(EditUpdate(layers=layers), [], {}, diagnostics={"consolidated": {}})
        assert v4.modules[names[0]]["replaces"] is True and "replaces" not in v4.modules.get(
            names[1], {}
        )
        store.commit(make_update(base, seed=10), make_facts(5), {})
        j = joint.layers[names[0]]
        after = make_update(base, seed=10).layers[names[0]]
        expected = lowrank_product(j.left, j.right) + lowrank_product(after.left, after.right)
        assert torch.equal(store.deltas()[names[0]], expected)
        replayed = store.deltas(use_snapshots=False)
        assert delta_sha(replayed) == delta_sha(store.deltas())
        # The LoRA factors start at the replacing version for that module only.
        factors = store.factors()
        assert len(factors[names[0]]) == 2 and len(factors[names[1]]) == 3
        head = store.expected_sha256()
        store.rollback(3, "operator")
        assert {n: tensor_sha256(t) for n, t in store.served().items()} == seen[3]
    with EditStore(tmp_path, snapshot_every=2) as store:
        store.open(base)
        assert store.verify(5) == [] and store.expected_sha256(5) == head


def test_lowrank_product_is_exact_and_independent_of_threads():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(300, 17, generator=g), torch.randn(17, 5000, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lowrank_product(left, right)
        torch.set_num_threads(2)
        two = lowrank_product(left, right)
    finally:
        torch.set_num_threads(threads)
    assert tensor_sha256(one) == tensor_sha256(two)
    exact = left.double() @ right.double()
    # Summed in float64 and rounded once: within one float32 rounding of the exact product.
    assert torch.allclose(one.double(), exact, rtol=2**-23, atol=1e-12)


def test_new_versions_after_a_rollback_get_new_numbers(tmp_path):
    base = base_of(tiny_llama(torch.bfloat16))
    with EditStore(tmp_path) as store:
        store.create(base)
        commit_n(store, base, 4)
        store.rollback(2, "test")
        info = store.commit(make_update(base, 7), make_facts(50), {"facts/0": 500})
        assert (info.version, info.parent, store.current) == (5, 2, 5)
        assert store.lineage() == [0, 1, 2, 5]
        with pytest.raises(StoreError, match="is undone"):
            store.rollback(3, "test")
        with pytest.raises(VersionNotFound, match="no such version"):
            store.rollback(9, "test")
        # The rolled-back facts may be applied again; live ones may not.
        store.commit(make_update(base, 8), make_facts(3), {"facts/0": 600})
        with pytest.raises(ValueError, match="already applied"):
            store.commit(make_update(base, 9), make_facts(50)[:1], {})
        assert store.verify() == []


def test_recovery_state_survives_reopen(tmp_path):
    base = base_of(tiny_llama(torch.bfloat16))
    with EditStore(tmp_path) as store:
        store.create(base)
        updates = []
        for v in range(1, 5):
            updates.append(make_update(base, seed=v))
            store.commit(updates[-1], make_facts(v), {"facts/0": 10 * v, ("facts", 1): 5 * v})
        store.rollback(2, "test")
        store.record_scores(2, {"es": 1.0, "ps": 0.9, "ns": 0.8, "s": 0.89})
    with EditStore(tmp_path) as store:
        store.open(base)
        assert store.current == 2
        assert store.applied_fact_ids() == {"f-1-0", "f-1-1", "f-2-0", "f-2-1"}
        keys = store.keys_by_version()
        assert [v for v, _ in keys] == [1, 2]
        for (_, per_module), update in zip(keys, updates[:2], strict=True):
            for name, layer in update.layers.items():
                assert torch.equal(per_module[name], layer.keys)
        version = store.version(2)
        assert version.scores["s"] == 0.89 and version.scored
        assert version.offsets == {"facts/0": 20, "facts/1": 10}
        assert version.timings == {}
        assert version.diagnostics == {"residual": 0.25, "nan": "inf"}
        assert version.fact_ids == ("f-2-0", "f-2-1")
        assert store.version(3).state is VersionState.UNDONE
        assert store.version(3).undone.reason == "test"
        on_disk = json.loads((tmp_path / "versions" / "000002" / "manifest.json").read_text())
        assert "fact_ids" not in on_disk  # the facts' own ids, not a second copy

        pending = store.outbox.pending()
        assert [(r.version, r.rolled_back_to, r.reason, r.kind) for r in pending] == [
            (3, 2, "test", "rolled_back"),
            (4, 2, "test", "rolled_back"),
        ]
        key, value, headers = pending[0].messages()[0]
        assert key == b"Subject 3.0" and json.loads(value)["id"] == "f-3-0"
        assert dict(headers) == {
            "reason": b"test",
            "kind": b"rolled_back",
            "fact_id": b"f-3-0",
            "version": b"3",
            "rolled_back_to": b"2",
        }
        store.outbox.done(pending[0].id)
        assert [r.version for r in store.outbox.pending()] == [4]
        with pytest.raises(VersionNotFound):
            store.version(99)
        with pytest.raises(VersionNotFound):
            store.rollback(99, "no such version")
    with EditStore(tmp_path, readonly=True) as store:
        store.open()
        assert [r.version for r in store.outbox.pending()] == [4]
        assert [len(v.facts) for v in store.versions()] == [0, 2, 2, 2, 2]
        listed = {i["version"]: i for i in store.listing()}
        assert listed[4]["rejected_pending"] and not listed[3]["rejected_pending"]
        assert listed[2]["current"] and listed[2]["scores"]["s"] == 0.89


def test_commit_refuses_updates_that_do_not_fit(tmp_path):
    base = base_of(tiny_llama(torch.bfloat16))
    with EditStore(tmp_path) as store:
        store.create(base)
        with pytest.raises(StoreMismatch, match="not among the store's modules"):
            store.commit(
                make_update({"model.layers.0.mlp.down_proj": base[module_names()[0]]}, 1),
                make_facts(1),
                {},
            )
        bad = make_update(base, 1)
        name = module_names()[0]
        layer = bad.layers[name]
        wrong = EditUpdate({name: LayerUpdate(layer.left, layer.right.T.contiguous(), layer.keys)})
        with pytest.raises(ValueError, match="do not fit"):
            store.commit(wrong, make_facts(1), {})
        nan_left = layer.left.clone()
        nan_left[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            store.commit(
                EditUpdate({name: LayerUpdate(nan_left, layer.right, layer.keys)}),
                make_facts(1),
                {},
            )
        with pytest.raises(ValueError, match="same fact id twice"):
            store.commit(bad, make_facts(1) * 2, {})
        with pytest.raises(ValueError, match="with an id"):
            store.commit(bad, [{"subject": "x"}], {})
        assert store.current == 0
        assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["000000"]


def test_open_refuses_another_base_and_a_second_writer(tmp_path):
    model = tiny_llama(torch.bfloat16)
    base = base_of(model)
    with EditStore(tmp_path) as store:
        store.create(base)
        store.commit(make_update(base, 1), make_facts(1), {})
        with pytest.raises(StoreLocked):
            EditStore(tmp_path).open()
        with EditStore(tmp_path, readonly=True) as reader:
            reader.open()
            assert reader.current == 1
            with pytest.raises(StoreError, match="read-only"):
                reader.rollback(0, "no")
    with pytest.raises(StoreMismatch, match="edits"):
        EditStore(tmp_path).open({module_names()[0]: base[module_names()[0]]})
    with pytest.raises(StoreMismatch, match="same dtype"):
        EditStore(tmp_path).open({n: t.float() for n, t in base.items()})
    other = base_of(tiny_llama(torch.bfloat16, seed=1))
    with pytest.raises(StoreMismatch, match="another checkpoint"):
        EditStore(tmp_path).open(other)
    with EditStore(tmp_path) as store:
        assert store.open_or_create(base) is False
        assert store.current == 1


def test_model_handle_serves_the_bits_the_manifest_records(tmp_path):
    """The daemon's path: ModelHandle.set_deltas(store.deltas()) on a bf16 Llama, then a
    rollback, checked with the handle's own weight_sha256."""
    model_mod = pytest.importorskip("editd.editing.model")
    model = tiny_llama(torch.bfloat16)
    handle = model_mod.ModelHandle(model=model, tokenizer=None)
    names = module_names()
    base = {n: handle.weight(n).detach().clone() for n in names}
    with EditStore(tmp_path, snapshot_every=4) as store:
        store.create(base)
        for v in range(1, 8):
            store.commit(make_update(base, seed=v), make_facts(v), {"facts/0": v})
            handle.set_deltas(store.deltas())
            assert handle.weight_sha256(names) == store.expected_sha256(v)
        store.rollback(3, "test")
        handle.set_deltas(store.deltas())
        assert handle.weight_sha256(names) == store.expected_sha256(3)
        store.rollback(0, "test")
        handle.set_deltas(store.deltas())
        assert handle.weight_sha256(names) == store.base_sha256()
