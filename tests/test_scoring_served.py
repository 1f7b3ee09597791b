"""Served accuracy: greedy generation from fact prompts, batched with left padding."""

from __future__ import annotations

import math

import pytest
import torch
from test_scoring_primitives import make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from editd.editing.decoding import greedy_continuations
from editd.editing.model import ModelHandle
from editd.editing.scoring import encode_pair, prompt_text, served_accuracy
from editd.editing.subject import leading_special_ids, pad_token_id
from editd.facts import FactUpdate
from editd.world.builtin import builtin_model_dir
from editd.world.requests import make_requests

# Small matmuls only lose from intra-op threads, and the machine's cores are shared.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    return ModelHandle.load(builtin_model_dir(), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def requests() -> list[FactUpdate]:
    # Five neighbours each instead of ten: prefill of the built-in model dominates the time.
    return [
        FactUpdate(
            **{**f.model_dump(exclude={"id"}), "neighborhood_prompts": f.neighborhood_prompts[:5]}
        )
        for f in make_requests(16, seed=3)
    ]


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    prefix = leading_special_ids(tokenizer)
    return [encode_pair(tokenizer, p, "x", prefix)[0] for p in prompts]


@torch.no_grad()
def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """One prompt, no padding, no cache: the whole sequence again at every step."""
    seq = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids) :]


def mixed_prompts(facts: list[FactUpdate]) -> list[str]:
    prompts = []
    for f in facts[:4]:
        prompts += [f.rendered_prompt, prompt_text(f.paraphrase_prompts[0], f.subject)]
        prompts += list(f.neighborhood_prompts[:2])
    return prompts


def test_unedited_model_does_not_say_the_new_objects(handle, requests):
    tok = handle.tokenizer
    side = tok.padding_side
    s = served_accuracy(handle.model, tok, requests)
    assert tok.padding_side == side
    assert s.es <= 0.1 and s.ps <= 0.1
    assert s.ns >= 0.9 and s.ns_true >= 0.8
    assert (s.facts, s.edit_prompts, s.paraphrase_prompts) == (16, 16, 16)
    assert (
        s.neighborhood_prompts
        == s.ns_true_prompts
        == sum(len(f.neighborhood_prompts) for f in requests)
    )
    assert set(s.as_dict()) >= {"es", "ps", "ns", "ns_true", "facts"}


def test_what_the_model_says_scores_as_served(handle, requests):
    """target_new := the model's own greedy continuation, so every edit prompt is a hit."""
    model, tok = handle.model, handle.tokenizer
    prefix = leading_special_ids(tok)
    edit_ids = prompt_ids(tok, [f.rendered_prompt for f in requests])
    said = greedy_continuations(model, edit_ids, [2] * len(requests), pad_id=pad_token_id(tok))
    facts = []
    for f, ids in zip(requests, said, strict=True):
        text = tok.decode(ids, skip_special_tokens=True).strip()
        # Only continuations that tokenize back to what was generated are well-defined objects.
        if text and encode_pair(tok, f.rendered_prompt, text, prefix)[1] == ids:
            facts.append(
                FactUpdate(
                    subject=f.subject,
                    prompt=f.prompt,
                    target_new=text,
                    paraphrase_prompts=f.paraphrase_prompts,
                    neighborhood_prompts=f.neighborhood_prompts,
                )
            )
    assert len(facts) >= len(requests) // 2
    s = served_accuracy(model, tok, facts)
    assert s.es == 1.0
    # No fact names a true object, so the stricter neighbourhood figure has nothing to count.
    assert math.isnan(s.ns_true) and s.ns_true_prompts == 0
    # One generated token is fewer than the two-token objects: never a hit.
    short = served_accuracy(model, tok, facts, max_new_tokens=1)
    assert short.es == 0.0
    # A longer budget reads the same first tokens.
    assert served_accuracy(model, tok, facts, max_new_tokens=4).es == 1.0


def test_neighbourhood_target_is_the_true_object_of_the_neighbours(handle, requests):
    f = requests[0]
    wrong = next(r.target_true for r in requests if r.target_true != f.target_true)
    moved = FactUpdate(**{**f.model_dump(exclude={"id"}), "neighborhood_target": wrong})
    s_true = served_accuracy(handle.model, handle.tokenizer, [f])
    s_moved = served_accuracy(handle.model, handle.tokenizer, [moved])
    assert s_true.ns_true == 1.0 and s_moved.ns_true == 0.0
    assert s_true.ns == s_moved.ns == 1.0


def test_batched_generation_equals_one_prompt_at_a_time(handle, requests):
    model, tok = handle.model, handle.tokenizer
    prompts = mixed_prompts(requests)
    ids = prompt_ids(tok, prompts)
    assert len({len(i) for i in ids}) >= 3  # mixed lengths, so rows really are padded
    lengths = [1 + i % 4 for i in range(len(ids))]
    pad = pad_token_id(tok)
    batched = greedy_continuations(model, ids, lengths, pad_id=pad, batch_size=len(ids))
    single = greedy_continuations(model, ids, lengths, pad_id=pad, batch_size=1)
    assert batched == single
    assert [len(b) for b in batched] == lengths
    for i in range(0, len(ids), 4):
        assert batched[i] == naive_greedy(model, ids[i], lengths[i])
    by_batch = [
        served_accuracy(model, tok, requests[:4], batch_size=b).as_dict() for b in (1, 3, 64)
    ]
    assert by_batch[0] == by_batch[1] == by_batch[2]


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A random Llama whose greedy tokens depend on positions: a wrong position id shows.

    With the default RoPE base and initialisation, shifting a position by one moves logits by
    about 1e-4 and never the argmax; a small base and large weights make it change.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10.0},
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("with_bos", [True, False])
def test_left_padding_on_a_random_llama(with_bos):
    # A hand-made byte-level BPE with and without BOS (real tokenizers may add none).
    tok = make_tokenizer(with_bos=with_bos)
    model = tiny_llama(len(tok))
    prompts = [
        "The capital of Norway is",
        "Ada was born in",
        "The Eiffel Tower is located in the beautiful old city of",
        "Paris",
    ]
    ids = prompt_ids(tok, prompts)
    assert (ids[0][0] == tok.bos_token_id) == with_bos
    pad = pad_token_id(tok)
    batched = greedy_continuations(model, ids, [5] * 4, pad_id=pad)
    assert batched == [naive_greedy(model, i, 5) for i in ids]


def test_tokenizer_state_is_left_as_it_was(handle, requests):
    tok = handle.tokenizer
    model = tiny_llama(len(tok))
    before = tok.padding_side
    results = []
    try:
        for side in ("right", "left"):
            tok.padding_side = side
            results.append(served_accuracy(model, tok, requests[:3]).as_dict())
            assert tok.padding_side == side
    finally:
        tok.padding_side = before
    assert results[0] == results[1]


def test_an_empty_fact_list_scores_nothing(handle):
    s = served_accuracy(handle.model, handle.tokenizer, [])
    assert s.facts == 0 and all(math.isnan(v) for v in (s.es, s.ps, s.ns, s.ns_true))


def test_the_server_says_greedily_what_served_scoring_measures(handle, requests):
    # One decoder: a temperature-0 completion over HTTP is the greedy continuation that the
    # served ES/PS compare with the new object.
    from editd.daemon.generation import Generator, SamplingParams

    tok = handle.tokenizer
    prompts = mixed_prompts(requests)[:6]
    ids = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    greedy = greedy_continuations(handle.model, ids, [4] * len(ids), pad_id=pad_token_id(tok))
    served = Generator(handle, lambda: 0).complete(
        prompts, SamplingParams(max_tokens=4, temperature=0)
    )
    for prompt_ids_, said, choice in zip(ids, greedy, served.choices, strict=True):
        assert choice.completion_tokens == 4  # no EOS, so the texts are comparable
        head = tok.decode(prompt_ids_, skip_special_tokens=True)
        assert choice.text == tok.decode(prompt_ids_ + said, skip_special_tokens=True)[len(head) :]
