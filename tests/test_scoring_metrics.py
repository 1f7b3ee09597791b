"""ES/PS/NS/S on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from test_scoring_primitives import make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from editd.editing.scoring import (
    FactLogprobs,
    canary_accuracy,
    continuation_logprobs,
    fact_logprobs,
    harmonic_mean,
    prompt_text,
    score_facts,
    summarize,
)
from editd.facts import FactUpdate

# A world small enough to memorise in seconds: who lives where, and two phrasings.
HOMES = {
    "Alma Berg": "Oslo",
    "Bruno Costa": "Oslo",
    "Clara Diaz": "New York City",
    "Dario Eck": "New York City",
    "Elif Fong": "Lima",
    "Farid Gul": "Lima",
}
TEMPLATES = ("{} lives in", "The home town of {} is")


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(3 / 4)
    assert harmonic_mean([0.0, 1.0, 1.0]) == 0.0
    assert harmonic_mean([math.nan, 0.5, 1.0]) == pytest.approx(2 / 3)
    assert math.isnan(harmonic_mean([math.nan]))


def test_summarize_known_numbers():
    ln = math.log
    facts = [
        # Edit succeeds; one of two paraphrases does; the neighbour keeps its object.
        FactLogprobs(
            edit=((ln(0.6), ln(0.2)),),
            paraphrase=((ln(0.5), ln(0.25)), (ln(0.1), ln(0.3))),
            neighborhood=((ln(0.1), ln(0.7)),),
        ),
        # Edit fails; the neighbour flipped to the new object.
        FactLogprobs(
            edit=((ln(0.2), ln(0.4)),),
            paraphrase=((ln(0.3), ln(0.2)), (ln(0.4), ln(0.1))),
            neighborhood=((ln(0.5), ln(0.3)), (ln(0.2), ln(0.6))),
        ),
    ]
    s = summarize(facts, skipped=3)
    assert s.es == pytest.approx(0.5)
    assert s.ps == pytest.approx((0.5 + 1.0) / 2)
    assert s.ns == pytest.approx((1.0 + 0.5) / 2)
    assert s.s == pytest.approx(harmonic_mean([0.5, 0.75, 0.75]))
    assert s.es_magnitude == pytest.approx(((0.6 - 0.2) + (0.2 - 0.4)) / 2)
    assert s.ps_magnitude == pytest.approx(((0.25 - 0.2) / 2 + (0.1 + 0.3) / 2) / 2)
    assert s.ns_magnitude == pytest.approx((0.6 + (-0.2 + 0.4) / 2) / 2)
    assert (s.facts, s.skipped) == (2, 3)
    assert (s.edit_prompts, s.paraphrase_prompts, s.neighborhood_prompts) == (2, 4, 3)


def test_summarize_without_paraphrases_leaves_ps_undefined():
    s = summarize([FactLogprobs(edit=((-1.0, -2.0),), paraphrase=(), neighborhood=())])
    assert s.es == 1.0 and math.isnan(s.ps) and math.isnan(s.ns) and s.s == 1.0


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained until it completes every sentence of HOMES greedily."""
    tokenizer = make_tokenizer(with_bos=True)
    tokenizer.pad_token = tokenizer.eos_token  # for the training batch only
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    texts = [t.format(s) + " " + o for s, o in HOMES.items() for t in TEMPLATES]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompts = [t.format(s) for s in HOMES for t in TEMPLATES]
    objects = [o for o in HOMES.values() for _ in TEMPLATES]
    assert canary_accuracy(model, tokenizer, prompts, objects) == 1.0
    return model, tokenizer


def fact(subject: str, new: str, true: str | None) -> FactUpdate:
    others = [s for s, o in HOMES.items() if o == true and s != subject]
    return FactUpdate(
        subject=subject,
        prompt=TEMPLATES[0],
        target_new=new,
        target_true=true,
        paraphrase_prompts=(TEMPLATES[1],),
        neighborhood_prompts=tuple(TEMPLATES[0].format(s) for s in others),
    )


def test_unedited_model_scores_zero_efficacy_and_full_locality(trained):
    model, tokenizer = trained
    facts = [fact("Alma Berg", "Lima", "Oslo"), fact("Clara Diaz", "Oslo", "New York City")]
    s = score_facts(model, tokenizer, facts)
    assert (s.es, s.ps, s.ns, s.s) == (0.0, 0.0, 1.0, 0.0)
    assert s.es_magnitude < -0.5 and s.ps_magnitude < -0.5 and s.ns_magnitude > 0.5
    assert (s.facts, s.edit_prompts, s.paraphrase_prompts, s.neighborhood_prompts) == (2, 2, 2, 2)


def test_a_request_the_model_already_states_scores_as_applied(trained):
    # "New" is what the model says and "true" what it does not: as if the edit had landed
    # on this subject and bled into its neighbours (who share the object the model states).
    model, tokenizer = trained
    facts = [
        FactUpdate(
            subject="Alma Berg",
            prompt=TEMPLATES[0],
            target_new="Oslo",
            target_true="New York City",
            paraphrase_prompts=(TEMPLATES[1],),
            neighborhood_prompts=(TEMPLATES[0].format("Bruno Costa"),),
        )
    ]
    s = score_facts(model, tokenizer, facts)
    assert (s.es, s.ps, s.ns, s.s) == (1.0, 1.0, 0.0, 0.0)
    assert s.es_magnitude > 0.3 and s.ns_magnitude < -0.3


def test_facts_without_a_true_object_are_skipped(trained):
    model, tokenizer = trained
    facts = [fact("Elif Fong", "Oslo", "Lima"), fact("Farid Gul", "Oslo", None)]
    s = score_facts(model, tokenizer, facts)
    assert (s.facts, s.skipped, s.edit_prompts) == (1, 1, 1)
    assert s.es == 0.0 and s.ns == 1.0


def test_canary_counts_multi_token_objects_only_when_whole(trained):
    model, tokenizer = trained
    prompts = [TEMPLATES[0].format("Clara Diaz")] * 3
    # The full object, a wrong last word, a wrong first word.
    acc = canary_accuracy(model, tokenizer, prompts, ["New York City", "New York Lima", "Oslo"])
    assert acc == pytest.approx(1 / 3)


def test_neighbourhood_prompts_are_scored_against_their_own_true_object(trained):
    # Alma's edit Oslo -> Lima, checked on a neighbour who lives in New York City, not Oslo.
    model, tokenizer = trained
    neighbour = TEMPLATES[0].format("Clara Diaz")
    base = {
        "subject": "Alma Berg",
        "prompt": TEMPLATES[0],
        "target_new": "Lima",
        "target_true": "Oslo",
        "neighborhood_prompts": (neighbour,),
    }
    plain, targeted = FactUpdate(**base), FactUpdate(**base, neighborhood_target="New York City")
    mean = [
        float(lp.mean())
        for lp in continuation_logprobs(
            model, tokenizer, [neighbour] * 3, ["Lima", "Oslo", "New York City"]
        )
    ]
    lima, oslo, nyc = mean
    [scored_plain, scored_targeted] = fact_logprobs(model, tokenizer, [plain, targeted])
    assert scored_plain.neighborhood[0] == pytest.approx((lima, oslo))
    assert scored_targeted.neighborhood[0] == pytest.approx((lima, nyc))
    # The edit prompt still compares against target_true.
    assert scored_targeted.edit == scored_plain.edit
    s = score_facts(model, tokenizer, [targeted])
    assert s.ns == 1.0 and s.ns_magnitude > 0.5


def test_prompt_text_renders_templates_and_keeps_full_texts() -> None:
    assert prompt_text("The home town of {} is", "Alma Berg") == "The home town of Alma Berg is"
    # Braces besides the placeholder, and in the subject, are text, not format fields.
    assert prompt_text("{x} said {} {{is}}", "A{0}B") == "{x} said A{0}B {{is}}"
    assert prompt_text("Alma Berg lives in", "Alma Berg") == "Alma Berg lives in"


def test_paraphrase_templates_with_braces_are_scored_as_their_text(trained):
    model, tokenizer = trained
    base = {
        "subject": "Alma Berg",
        "prompt": TEMPLATES[0],
        "target_new": "Lima",
        "target_true": "Oslo",
    }
    template = FactUpdate(**base, paraphrase_prompts=("{note} The home town of {} is",))
    text = FactUpdate(**base, paraphrase_prompts=("{note} The home town of Alma Berg is",))
    [a, b] = fact_logprobs(model, tokenizer, [template, text])
    assert a.paraphrase == b.paraphrase
