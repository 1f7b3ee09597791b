"""The gated edit memory (editd.memory): the gate math on random tensors, its versions in the
store (exact rollback, reopen, the update log to a replica), and a model that serves it."""

from __future__ import annotations

import pytest
import torch

from editd.editing.model import ModelHandle
from editd.lowrank import EditUpdate, LayerUpdate, tensor_sha256
from editd.memory import (
    MEMORY_SHA256,
    Block,
    Gate,
    GatedMemory,
    ServedMemory,
    embed,
    gate_projection,
)
from editd.store.store import EditStore, StoreError, StoreMismatch
from editd.store.wire import UpdateLogSource, decode_version
from editd.versions import VersionedModel
from tests.test_store_versions import tiny_llama

D_OUT, D_IN, B = 16, 48, 3


def exact_block(version: int, keys: torch.Tensor, residuals: torch.Tensor, tau: float = 0.9):
    """A block whose update maps each key exactly to its residual (an EMMET solve with C = I):
    Δ = R (KᵀK)⁻¹ Kᵀ."""
    right = torch.linalg.solve(keys.T @ keys, keys.T)  # (b, d_in)
    projection = torch.eye(D_IN)
    return Block(
        version=version,
        layers={"m": (residuals, right)},
        gate=Gate("m", tau, projection, embed(keys.T, projection)),
    )


def test_a_matching_key_gets_the_exact_write_and_a_far_key_none():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(D_IN, B, generator=g, dtype=torch.float64).float()
    residuals = torch.randn(D_OUT, B, generator=g)
    served = ServedMemory.build(
        GatedMemory((exact_block(1, keys, residuals),)), torch.device("cpu")
    )

    x = keys.T  # (B, d_in): each fact's own key
    opened = served.open_blocks(x)
    assert opened.all()
    write = served.write("m", x, opened)
    torch.testing.assert_close(write, residuals.T, rtol=1e-4, atol=1e-4)

    # A key orthogonal to every stored one opens nothing, and nothing is written.
    far = torch.randn(4, D_IN, generator=g)
    q, _ = torch.linalg.qr(torch.cat([keys, far.T], dim=1))
    far = q[:, B:].T  # (4, d_in), orthogonal to the keys
    closed = served.open_blocks(far)
    assert not closed.any()
    assert served.write("m", far, closed) is None

    # A key near one fact's (cosine above τ) opens that block: the paraphrase case.
    near = keys[:, 1] + 0.1 * keys[:, 1].norm() * far[0] / far[0].norm()
    assert served.open_blocks(near[None]).tolist() == [[True]]


def test_the_editor_solves_against_writes_only_where_the_served_gate_opens():
    """`update_hooks` with a gate: what the editor's own passes see is what the memory serves.

    The gate module decides from its input; a later module writes at the same tokens,
    whatever its own input is, and nowhere else.
    """
    from editd.editing.keys import update_hooks

    g = torch.Generator().manual_seed(4)
    keys = torch.randn(D_IN, B, generator=g)
    residuals = torch.randn(D_OUT, B, generator=g)
    block = exact_block(1, keys, residuals)
    right = block.layers["m"][1]
    first = LayerUpdate(left=residuals, right=right, keys=keys)
    later = LayerUpdate(left=torch.randn(D_OUT, B, generator=g), right=right, keys=keys)
    hooks = update_hooks({"m": first, "n": later}, block.gate)

    far = torch.randn(D_IN, generator=g)
    far = far - keys @ torch.linalg.lstsq(keys, far).solution  # orthogonal to every key
    x = torch.stack([far, keys[:, 2], far])[None]  # (1, 3, d_in): token 1 reads fact 2
    out = torch.zeros(1, 3, D_OUT)
    written = hooks["m"](out, x)
    torch.testing.assert_close(written[0, 1], residuals[:, 2], rtol=1e-4, atol=1e-4)
    assert torch.equal(written[0, [0, 2]], torch.zeros(2, D_OUT))

    y = torch.randn(1, 3, D_IN, generator=g)  # the later module's own inputs
    second = hooks["n"](out, y)
    torch.testing.assert_close(second[0, 1], later.left @ (right @ y[0, 1]))
    assert torch.equal(second[0, [0, 2]], torch.zeros(2, D_OUT))

    # Without a gate the same update writes at every token (the weight form).
    everywhere = update_hooks({"m": first})["m"](out, x)
    assert bool((everywhere[0, 0] != 0).any())


def test_blocks_open_independently_and_add_where_both_open():
    g = torch.Generator().manual_seed(1)
    k1, k2 = torch.randn(D_IN, B, generator=g), torch.randn(D_IN, B, generator=g)
    r1, r2 = torch.randn(D_OUT, B, generator=g), torch.randn(D_OUT, B, generator=g)
    memory = GatedMemory((exact_block(1, k1, r1), exact_block(2, k2, r2)))
    served = ServedMemory.build(memory, torch.device("cpu"))
    x = torch.cat([k1.T, k2.T])  # (2B, d_in)
    opened = served.open_blocks(x)
    assert opened[:B, 0].all() and not opened[:B, 1].any()
    assert opened[B:, 1].all() and not opened[B:, 0].any()
    write = served.write("m", x, opened)
    torch.testing.assert_close(write, torch.cat([r1.T, r2.T]), rtol=1e-4, atol=1e-4)


def test_the_fingerprint_covers_factors_keys_projection_and_threshold():
    g = torch.Generator().manual_seed(2)
    keys, res = torch.randn(D_IN, B, generator=g), torch.randn(D_OUT, B, generator=g)
    block = exact_block(1, keys, res)
    base = GatedMemory((block,)).fingerprint()
    assert GatedMemory((exact_block(1, keys, res),)).fingerprint() == base
    changed = [
        Block(1, {"m": (res + 1e-6, block.layers["m"][1])}, block.gate),
        Block(1, block.layers, Gate("m", 0.91, block.gate.projection, block.gate.keys)),
        Block(1, block.layers, Gate("m", 0.9, block.gate.projection * 2, block.gate.keys)),
        Block(2, block.layers, block.gate),
    ]
    assert len({GatedMemory((b,)).fingerprint() for b in changed} | {base}) == 5


def test_a_fact_with_its_own_threshold_opens_only_above_it():
    """Per-fact thresholds: a fact raised above what a near key reaches stays shut there,
    while its own key and the other facts open as before, in the served memory and in the
    editor's own passes alike."""
    from editd.editing.keys import update_hooks

    g = torch.Generator().manual_seed(5)
    keys = torch.randn(D_IN, B, generator=g)
    residuals = torch.randn(D_OUT, B, generator=g)
    block = exact_block(1, keys, residuals)
    far = torch.randn(D_IN, generator=g)
    far = far - keys @ torch.linalg.lstsq(keys, far).solution
    near = keys[:, 1] + 0.3 * keys[:, 1].norm() * far / far.norm()  # cosine ≈ 0.96
    x = torch.stack([keys[:, 0], keys[:, 1], near])  # (3, d_in)
    assert ServedMemory.build(GatedMemory((block,)), torch.device("cpu")).open_blocks(x).squeeze(
        1
    ).tolist() == [True, True, True]

    raised = torch.tensor([0.9, 0.99, 0.9])
    gate = Gate("m", 0.9, block.gate.projection, block.gate.keys, thresholds=raised)
    own = Block(1, block.layers, gate)
    served = ServedMemory.build(GatedMemory((own,)), torch.device("cpu"))
    assert served.open_blocks(x).squeeze(1).tolist() == [True, True, False]
    torch.testing.assert_close(gate.fact_thresholds(), raised)

    update = LayerUpdate(left=residuals, right=block.layers["m"][1], keys=keys)
    written = update_hooks({"m": update}, gate)["m"](torch.zeros(1, 3, D_OUT), x[None])
    assert bool((written[0, :2] != 0).any(dim=1).all())
    assert torch.equal(written[0, 2], torch.zeros(D_OUT))

    # The thresholds are part of what is served: they change the fingerprint.
    assert GatedMemory((own,)).fingerprint() != GatedMemory((block,)).fingerprint()


def test_the_projection_whitens_the_leading_directions():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    c0 = a @ a.T / D_IN
    p = gate_projection(c0, 8).double()  # (d_in, 8)
    torch.testing.assert_close(p.T @ c0 @ p, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


# -- on a model ---------------------------------------------------------------------------------

EDITED = [1, 2]


def tiny_handle(seed: int = 0) -> ModelHandle:
    return ModelHandle(model=tiny_llama(torch.float32, seed), tokenizer=None)


def inputs_at(handle: ModelHandle, module: str, ids: torch.Tensor) -> torch.Tensor:
    seen = {}

    def keep(_m, args, _o) -> None:
        seen["x"] = args[0].detach().clone()

    hook = handle.model.get_submodule(module).register_forward_hook(keep)
    try:
        handle.model(input_ids=ids)
    finally:
        hook.remove()
    return seen["x"][0]  # (T, d_in)


def gated_update(
    handle: ModelHandle,
    ids: torch.Tensor,
    position: int,
    seed: int,
    thresholds: torch.Tensor | None = None,
) -> EditUpdate:
    """A batch of one 'fact': its key is the gate module's input at `position` of `ids`."""
    names = [handle.module_name(i) for i in EDITED]
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        w = handle.weight(name)
        key = inputs_at(handle, name, ids)[position][:, None]  # (d_in, 1)
        layers[name] = LayerUpdate(
            left=torch.randn(w.shape[0], 1, generator=g),
            right=(key / key.norm() ** 2).T.contiguous(),
            keys=key,
        )
    gate_key = layers[names[0]].keys.T
    projection = torch.eye(handle.weight(names[0]).shape[1])
    gate = Gate(names[0], 0.95, projection, embed(gate_key, projection), thresholds)
    return EditUpdate(layers=layers, gate=gate)


def facts(n: int) -> list[dict]:
    return [{"id": f"fact-{n}", "subject": f"S{n}", "prompt": "{} is", "target_new": "x"}]


def test_a_gated_version_changes_its_own_text_and_leaves_other_text_bit_for_bit(tmp_path):
    handle = tiny_handle()
    names = [handle.module_name(i) for i in EDITED]
    edited_text = torch.tensor([[5, 9, 13, 17]])
    other_text = torch.tensor([[40, 41, 42, 43, 44, 45]])
    base_logits = {
        k: handle.model(input_ids=t).logits.clone()
        for k, t in (("edited", edited_text), ("other", other_text))
    }
    base_sha = {n: tensor_sha256(handle.weight(n)) for n in names}
    model = VersionedModel.open(handle, tmp_path / "store", modules=names)
    try:
        v1 = model.apply(gated_update(handle, edited_text, 1, seed=1), facts(1)).version
        assert v1.gate is not None and MEMORY_SHA256 in v1.sha256
        # The base weights are untouched; the memory is what changed.
        assert {n: v1.sha256[n] for n in names} == base_sha
        assert model.served_sha256() == v1.sha256
        after = handle.model(input_ids=edited_text).logits
        assert not torch.equal(after, base_logits["edited"])
        assert torch.equal(after[:, :1], base_logits["edited"][:, :1])  # before the key
        assert torch.equal(handle.model(input_ids=other_text).logits, base_logits["other"])
        assert handle.gate_counter.snapshot().fired >= 1

        v2 = model.apply(gated_update(handle, other_text, 3, seed=2), facts(2)).version
        assert v2.sha256[MEMORY_SHA256] != v1.sha256[MEMORY_SHA256]
        # Both versions use one projection: the store keeps one file of it.
        assert len(list((tmp_path / "store" / "gates").iterdir())) == 1
        model.rollback(1, "test")
        assert model.served_sha256() == v1.sha256
        assert torch.equal(handle.model(input_ids=other_text).logits, base_logits["other"])
        model.rollback(0, "test")
        assert model.served_sha256() == base_sha
        assert torch.equal(handle.model(input_ids=edited_text).logits, base_logits["edited"])
        v3 = model.apply(gated_update(handle, edited_text, 2, seed=3), facts(3)).version
    finally:
        model.close()

    # A restart serves version 3 again, checked against its manifest.
    fresh = tiny_handle()
    reopened = VersionedModel.open(fresh, tmp_path / "store", modules=names)
    try:
        assert reopened.current == v3.version
        assert reopened.served_sha256() == v3.sha256
    finally:
        reopened.close()


def test_a_replica_rebuilds_the_same_gated_memory_from_the_update_log(tmp_path):
    handle = tiny_handle()
    names = [handle.module_name(i) for i in EDITED]
    text = torch.tensor([[5, 9, 13, 17]])
    editor = VersionedModel.open(handle, tmp_path / "editor", modules=names)
    replica_handle = tiny_handle()
    replica = VersionedModel.open(replica_handle, tmp_path / "replica", modules=names)
    try:
        editor.apply(gated_update(handle, text, 1, seed=1), facts(1))
        # One version with a per-fact threshold: it travels, and is checked, with the rest.
        limits = torch.tensor([0.97])
        editor.apply(gated_update(handle, text, 3, seed=2, thresholds=limits), facts(2))
        assert torch.equal(editor.store.memory().blocks[1].gate.thresholds, limits)
        source = UpdateLogSource(editor.store)
        for v in (1, 2):
            record, factors, base = decode_version(source.version_payload(v))
            assert replica.ingest(record, factors, base)
        from editd.store.wire import decode_current

        replica.follow(decode_current(source.current_payload(2, None)))
        assert replica.served_sha256() == editor.served_sha256()
        assert torch.equal(replica.store.memory().blocks[1].gate.thresholds, limits)
        assert torch.equal(
            replica_handle.model(input_ids=text).logits, handle.model(input_ids=text).logits
        )
    finally:
        editor.close()
        replica.close()


def test_one_lineage_serves_one_form(tmp_path):
    handle = tiny_handle()
    names = [handle.module_name(i) for i in EDITED]
    text = torch.tensor([[5, 9, 13, 17]])
    store = EditStore(tmp_path / "s")
    store.open_or_create({n: handle.weight(n).detach().clone() for n in names})
    try:
        gated = gated_update(handle, text, 1, seed=1)
        store.commit(gated, facts(1), {})
        plain = EditUpdate(layers=gated.layers)
        with pytest.raises(StoreMismatch, match="gated memory"):
            store.commit(plain, facts(2), {})
        with pytest.raises(StoreError, match="gated memory"):
            store.factors()
        # The weights of a gated store are the base: nothing accumulates in them.
        assert store.deltas() == {}
        assert store.verify() == []
    finally:
        store.close()


def test_a_store_is_served_in_the_form_it_was_made_with(tmp_path):
    from editd.editing.editor import Editor, EditorConfig
    from editd.editing.stats import Corpus
    from editd.store.store import StoreMismatch

    handle = tiny_handle()
    names = [handle.module_name(i) for i in EDITED]
    text = torch.tensor([[5, 9, 13, 17]])
    model = VersionedModel.open(handle, tmp_path / "store", modules=names)
    try:
        model.apply(gated_update(handle, text, 1, seed=1), facts(1))
    finally:
        model.close()
    # An editor of the other form is refused when the store opens, not at its first batch.
    editor = Editor(
        handle,
        EditorConfig(layers=tuple(EDITED), memory="weights"),
        corpus=Corpus(texts=("unused",)),
        cache_dir=tmp_path / "c0",
        progress=False,
    )
    with pytest.raises(StoreMismatch, match="gated memory"):
        VersionedModel.open(handle, tmp_path / "store", editor=editor)


def test_calibrated_thresholds_rise_above_what_the_reference_text_reaches():
    from editd.editing.gate import calibrated_thresholds

    g = torch.Generator().manual_seed(6)
    keys = torch.nn.functional.normalize(torch.randn(4, D_IN, generator=g), dim=1)
    far = torch.nn.functional.normalize(torch.randn(50, D_IN, generator=g), dim=1)
    # Reference text: random directions, plus one token close to key 1 and one equal to key 3.
    near = torch.nn.functional.normalize(keys[1] + 0.6 * far[0], dim=0)
    reference = torch.cat([far, near[None], keys[3][None]])
    limits = calibrated_thresholds(keys, reference, floor=0.6, margin=0.05, chunk=7)
    peak = (reference @ keys.T).amax(0)
    assert 0.6 < float(peak[1]) < 0.85
    assert limits[0] == 0.6 and limits[2] == 0.6  # nothing near: the floor
    torch.testing.assert_close(limits[1], peak[1] + 0.05)  # above the text it resembles
    assert limits[3] == 0.9  # never above the ceiling: it must still open on its own subject
    assert float(calibrated_thresholds(keys, reference[:0], 0.6, 0.05).max()) == pytest.approx(0.6)
