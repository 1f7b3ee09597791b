"""Continuation scoring on a tiny random Llama: indexing, padding sides, BOS handling."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editd.editing.scoring import (
    continuation_logprobs,
    encode_pair,
    greedy_match,
    heldout_perplexity,
    score_ids,
)
from editd.editing.subject import leading_special_ids

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CORPUS = [
    "The mother tongue of Danielle Darrieux is French",
    "The capital of Norway is Oslo",
    "Ada Lovelace was born in London",
    "The Eiffel Tower is located in Paris",
    "Marie Curie worked in the city of Paris",
    "The official language of Brazil is Portuguese",
]
PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The capital of Norway is",
    "Ada was born in",
    "The Eiffel Tower is located in the beautiful old city of",
]
OBJECTS = ["French", "Oslo", "New York City", "Paris"]


def make_tokenizer(with_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if with_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(with_bos=True)


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_bos_comes_from_the_tokenizer_and_appears_once(tokenizer):
    bos = tokenizer.bos_token_id
    assert leading_special_ids(tokenizer) == [bos]
    assert leading_special_ids(make_tokenizer(with_bos=False)) == []
    prefix = leading_special_ids(tokenizer)
    for prompt, obj in zip(PROMPTS, OBJECTS, strict=True):
        ids, cont = encode_pair(tokenizer, prompt, obj, prefix)
        assert ids[0] == bos and (ids + cont).count(bos) == 1
        assert tokenizer.decode(cont) == " " + obj
    # A prompt that already carries BOS as text gets no second one.
    ids, _ = encode_pair(tokenizer, BOS + PROMPTS[1], OBJECTS[1], prefix)
    assert ids.count(bos) == 1 and ids[0] == bos


def test_continuation_tokens_are_those_of_the_joined_text(tokenizer):
    prefix = leading_special_ids(tokenizer)
    for prompt, obj in zip(PROMPTS, OBJECTS, strict=True):
        ids, cont = encode_pair(tokenizer, prompt, obj, prefix)
        assert ids + cont == tokenizer(f"{prompt} {obj}")["input_ids"]


def test_logprobs_match_an_unbatched_forward(model, tokenizer):
    got = continuation_logprobs(model, tokenizer, PROMPTS, OBJECTS, batch_size=4)
    prefix = leading_special_ids(tokenizer)
    for (prompt, obj), lp in zip(zip(PROMPTS, OBJECTS, strict=True), got, strict=True):
        ids, cont = encode_pair(tokenizer, prompt, obj, prefix)
        with torch.no_grad():
            logits = model(torch.tensor([ids + cont])).logits[0].float()
        logp = logits.log_softmax(-1)
        expected = torch.stack([logp[len(ids) - 1 + j, t] for j, t in enumerate(cont)])
        assert lp.shape == (len(cont),) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_agree(model, tokenizer):
    results = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        results[side] = continuation_logprobs(model, tokenizer, PROMPTS, OBJECTS, batch_size=4)
    tokenizer.padding_side = "right"
    one_by_one = continuation_logprobs(model, tokenizer, PROMPTS, OBJECTS, batch_size=1)
    for left, right, single in zip(results["left"], results["right"], one_by_one, strict=True):
        torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left, single, atol=1e-5, rtol=1e-5)


def test_top1_flags_follow_the_argmax(model, tokenizer):
    prefix = leading_special_ids(tokenizer)
    prompt_ids = [
        encode_pair(tokenizer, p, o, prefix)[0] for p, o in zip(PROMPTS, OBJECTS, strict=True)
    ]
    # Greedy three tokens by hand; those must be flagged top-1, a changed one must not.
    greedy = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(3):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            greedy.append(seq[len(ids) :])
    for side in ("left", "right"):
        scored = score_ids(model, prompt_ids, greedy, pad_id=0, padding_side=side, batch_size=4)
        assert all(all(s.top1) for s in scored)
        wrong = [[g[0], g[1], (g[2] + 1) % len(tokenizer)] for g in greedy]
        scored = score_ids(model, prompt_ids, wrong, pad_id=0, padding_side=side, batch_size=4)
        assert all(s.top1 == (True, True, False) for s in scored)


def test_greedy_match_on_strings(model, tokenizer):
    # The random model's greedy choice at the first object token decides single-token objects.
    prefix = leading_special_ids(tokenizer)
    hits = greedy_match(model, tokenizer, PROMPTS, OBJECTS)
    for prompt, obj, hit in zip(PROMPTS, OBJECTS, hits, strict=True):
        ids, cont = encode_pair(tokenizer, prompt, obj, prefix)
        seq, expected = list(ids), True
        with torch.no_grad():
            for t in cont:
                expected &= int(model(torch.tensor([seq])).logits[0, -1].argmax()) == t
                seq.append(t)
        assert hit == expected


def test_scoring_leaves_the_model_as_it_was(model, tokenizer):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    continuation_logprobs(model, tokenizer, PROMPTS, OBJECTS)
    assert model.training
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size(model, tokenizer):
    ppl = heldout_perplexity(model, tokenizer, CORPUS)
    assert 0.5 * len(tokenizer) < ppl < 2 * len(tokenizer)


def test_bad_inputs_are_refused(model, tokenizer):
    with pytest.raises(ValueError):
        continuation_logprobs(model, tokenizer, PROMPTS, OBJECTS[:2])
    with pytest.raises(ValueError):
        continuation_logprobs(model, tokenizer, ["The capital of Norway is"], ["  "])
