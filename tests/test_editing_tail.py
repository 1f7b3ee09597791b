"""Target optimisation replays only the layers after the edit layer, and gets the same answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from editing_support import small_tokenizer, tiny_llama_dir

from editd.editing import targets as targets_module
from editd.editing.model import ModelHandle
from editd.editing.subject import render, tokenize
from editd.editing.tail import DecoderTail
from editd.editing.targets import TargetConfig, compute_targets
from editd.editing.trace import Trace
from editd.facts import FactUpdate

FACTS = [
    FactUpdate(
        subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English"
    ),
    FactUpdate(subject="Toko Yasuda", prompt="{} plays the", target_new="guitar"),
    FactUpdate(subject="Barack Obama", prompt="{} was born in", target_new="Paris"),
]


@pytest.fixture(scope="module", params=["right", "left"])
def handle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelHandle:
    tok = small_tokenizer()
    tok.padding_side = request.param
    path = tiny_llama_dir(tmp_path_factory.mktemp(f"tail-{request.param}"), tok, layers=4)
    return ModelHandle.load(path, device="cpu", dtype="float32")


def _batch(handle: ModelHandle):
    items = [render(f.prompt, f.subject, answer=f.target_new) for f in FACTS]
    return tokenize(handle.tokenizer, items)


@pytest.mark.parametrize("layer", [1, 3])
def test_replaying_the_tail_with_a_delta_equals_the_full_forward(
    handle: ModelHandle, layer: int
) -> None:
    batch = _batch(handle)
    name = handle.layer_name(layer)
    tail = DecoderTail.of(handle.model, handle.layer_names(), name)
    assert tail is not None and len(tail.layers) == handle.num_layers - layer - 1
    decoder = handle.model.get_decoder()
    with torch.no_grad(), tail.record(handle.model, name):
        full = decoder(**batch.model_inputs(), use_cache=False).last_hidden_state
    assert tail.matches(full, batch.attention_mask)
    # No hook outlives the recording.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in handle.model.modules())

    rows = torch.tensor([0, 2])
    sub = batch.select(rows, trim=False)
    delta = torch.randn(len(rows), handle.config.hidden_size)
    at = torch.arange(len(rows))

    def add(out: torch.Tensor, inp: torch.Tensor | None = None) -> torch.Tensor:
        return out.index_put((at, sub.subject_index), out[at, sub.subject_index] + delta)

    with torch.no_grad(), Trace(handle.model, name, edit_output=add):
        want = decoder(**sub.model_inputs(), use_cache=False).last_hidden_state
    with torch.no_grad():
        got = tail(add(tail.hidden[rows]), rows=rows)
    keep = sub.attention_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_a_replay_that_disagrees_with_the_model_is_refused(handle: ModelHandle) -> None:
    batch = _batch(handle)
    name = handle.layer_name(1)
    tail = DecoderTail.of(handle.model, handle.layer_names(), name)
    assert tail is not None
    with torch.no_grad(), tail.record(handle.model, name):
        full = handle.model.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    assert not tail.matches(full + 1.0, batch.attention_mask)
    tail.calls[0]["unsliceable"] = object()
    assert not tail.sliceable() and not tail.matches(full, batch.attention_mask)


def test_targets_are_the_same_with_and_without_the_replay(
    handle: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TargetConfig(steps=6)
    layer = handle.layer_name(1)
    with handle.reading():
        fast = compute_targets(handle, FACTS, layer, config)
        monkeypatch.setattr(targets_module.DecoderTail, "of", classmethod(lambda *a: None))
        slow = compute_targets(handle, FACTS, layer, config)
    torch.testing.assert_close(fast.delta, slow.delta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast.prob, slow.prob, rtol=1e-3, atol=1e-4)
    assert torch.equal(fast.steps, slow.steps)


def test_the_built_in_model_replays_only_its_final_norm(tmp_path: Path) -> None:
    from editd.world.builtin import builtin_model_dir

    handle = ModelHandle.load(builtin_model_dir(), device="cpu", dtype="float32")
    last = handle.layer_name(handle.num_layers - 1)
    tail = DecoderTail.of(handle.model, handle.layer_names(), last)
    assert tail is not None and len(tail.layers) == 0
    items = [render("{} was born in", "Kai Lakbrath", answer="Port Tavar")]
    batch = tokenize(handle.tokenizer, items)
    with torch.no_grad(), tail.record(handle.model, last):
        full = handle.model.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    assert tail.matches(full, batch.attention_mask)
