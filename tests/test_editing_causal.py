"""Causal tracing (editd.editing.causal) on a tiny random Llama with the built-in tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from editd.editing.causal import (
    causal_trace,
    pick_window,
    subject_token_range,
    window_layers,
)
from editd.editing.model import ModelHandle
from editd.editing.subject import render
from editd.facts import FactUpdate

LAYERS = 4

MID = FactUpdate(
    subject="Danielle Darrieux",
    prompt="The mother tongue of {} is",
    target_new="English",
    target_true="French",
)
# The subject's last token is the prompt's last token.
END = FactUpdate(
    subject="Danielle Darrieux", prompt="The home of {}", target_new="Rome", target_true="Paris"
)
NO_TRUE = FactUpdate(subject="Toko Yasuda", prompt="{} plays the", target_new="piano")


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    from editd.world.builtin import builtin_model_dir

    try:
        path = builtin_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"built-in model not built yet: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Larger than the default 0.02, so the next-token distribution is less flat and the
        # subject's noise moves it visibly.
        initializer_range=0.2,
    )
    return ModelHandle(model=LlamaForCausalLM(config), tokenizer=tokenizer)


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-5 * scale


def test_zero_noise_changes_nothing(handle: ModelHandle) -> None:
    r = causal_trace(handle, [MID, END], samples=3, noise=0.0)
    assert r.noise_std == 0.0
    assert _close(r.corrupted_prob, r.clean_prob, r.clean_prob)
    for e in (*r.mlp_effect, *r.hidden_effect):
        assert abs(e) <= 1e-5 * r.clean_prob


def test_restoring_the_last_layer_at_the_prompt_end_recovers_clean(handle: ModelHandle) -> None:
    r = causal_trace(handle, [END], samples=4)
    gap = r.clean_prob - r.corrupted_prob
    assert abs(gap) > 1e-2 * r.clean_prob  # the noise does something
    assert _close(r.corrupted_prob + r.hidden_effect[-1], r.clean_prob, r.clean_prob)
    assert r.best_hidden_layer in r.layers


def test_last_layer_before_the_prompt_end_has_no_effect(handle: ModelHandle) -> None:
    # Nothing after the last layer reads the subject's position but its own logits.
    r = causal_trace(handle, [MID], samples=4)
    assert r.clean_prob != r.corrupted_prob
    assert abs(r.hidden_effect[-1]) <= 1e-6 * r.clean_prob
    assert abs(r.mlp_effect[-1]) <= 1e-6 * r.clean_prob


def test_reproducible_with_the_same_seed(handle: ModelHandle) -> None:
    a = causal_trace(handle, [MID, END], samples=3, seed=7)
    b = causal_trace(handle, [MID, END], samples=3, seed=7)
    c = causal_trace(handle, [MID, END], samples=3, seed=8)
    assert a == b
    assert c.corrupted_prob != a.corrupted_prob


def test_a_subset_of_layers_matches_the_full_trace(handle: ModelHandle) -> None:
    full = causal_trace(handle, [MID, END], samples=3, window=3)
    part = causal_trace(handle, [MID, END], samples=3, window=3, layers=[2, 1])
    assert part.layers == (2, 1)
    for i, layer in enumerate(part.layers):
        assert part.mlp_effect[i] == pytest.approx(full.mlp_effect[layer], rel=1e-4, abs=1e-12)
        assert part.hidden_effect[i] == pytest.approx(
            full.hidden_effect[layer], rel=1e-4, abs=1e-12
        )
    assert part.corrupted_prob == pytest.approx(full.corrupted_prob, rel=1e-6)


def test_hooks_are_gone_afterwards(handle: ModelHandle) -> None:
    ids = handle.tokenizer(MID.rendered_prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = handle.model(input_ids=ids).logits
    causal_trace(handle, [MID], samples=2, window=3)
    with torch.no_grad():
        after = handle.model(input_ids=ids).logits
    assert torch.equal(before, after)
    for module in handle.model.modules():
        assert not module._forward_hooks and not module._forward_hooks_with_kwargs


def test_facts_without_a_true_object_are_skipped(handle: ModelHandle) -> None:
    r = causal_trace(handle, [MID, NO_TRUE], samples=2)
    assert (r.facts, r.skipped) == (1, 1)
    assert r.layers == tuple(range(LAYERS)) and len(r.mlp_effect) == LAYERS
    with pytest.raises(ValueError, match="target_true"):
        causal_trace(handle, [NO_TRUE])


@pytest.mark.parametrize(
    "kwargs",
    [{"samples": 0}, {"noise": -1.0}, {"window": 0}, {"layers": []}, {"layers": [LAYERS]}],
)
def test_bad_arguments(handle: ModelHandle, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        causal_trace(handle, [MID], **kwargs)


def test_subject_token_range_covers_the_subject(handle: ModelHandle) -> None:
    tok = handle.tokenizer
    item = render(MID.prompt, MID.subject)
    enc = tok(item.text, return_offsets_mapping=True, add_special_tokens=True)
    span = subject_token_range(enc["offset_mapping"], item.subject_span)
    assert len(span) >= 2 and span[0] >= 1  # several tokens, after BOS and "The mother ..."
    text = tok.decode(enc["input_ids"][span.start : span.stop])
    assert text.strip() == MID.subject
    with pytest.raises(ValueError):
        subject_token_range([(0, 0), (0, 3)], (5, 7))


@pytest.mark.parametrize(
    ("layer", "window", "n", "expected"),
    [
        (2, 1, 6, [2]),
        (2, 2, 6, [1, 2]),
        (2, 3, 6, [1, 2, 3]),
        (0, 3, 6, [0, 1]),
        (5, 3, 6, [4, 5]),
        (3, 10, 6, [0, 1, 2, 3, 4, 5]),
        (10, 10, 48, list(range(5, 15))),
    ],
)
def test_window_layers(layer: int, window: int, n: int, expected: list[int]) -> None:
    assert window_layers(layer, window, n) == expected


@pytest.mark.parametrize(
    ("effects", "size", "expected"),
    [
        ([0.1, 0.5, 0.2], 1, [1]),
        ([0.1, 0.5, 0.2], 2, [1, 2]),
        ([0.4, 0.1, 0.1, 0.4], 2, [0, 1]),  # tie: the earliest
        ([1.0, 1.0, 1.0], 2, [0, 1]),
        ([0.0, 0.3, 0.3, 0.0, 0.5], 2, [1, 2]),
        ([-1.0, -0.5, -2.0], 1, [1]),
        ([0.2, 0.1], 2, [0, 1]),
    ],
)
def test_pick_window(effects: list[float], size: int, expected: list[int]) -> None:
    assert pick_window(effects, size) == expected


@pytest.mark.parametrize("size", [0, 4])
def test_pick_window_rejects_sizes_that_do_not_fit(size: int) -> None:
    with pytest.raises(ValueError):
        pick_window([0.1, 0.2, 0.3], size)
