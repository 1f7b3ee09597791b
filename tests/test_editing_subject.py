"""Subject positions from offsets: BOS or not, start or middle, objects appended, any padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from editing_support import llama3_tokenizer, small_tokenizer, tiny_llama_dir

from editd.editing.model import ModelHandle
from editd.editing.subject import pad_rows, render, tokenize
from editd.editing.trace import Trace

CASES = [
    ("{} was born in", "Danielle Darrieux", None),  # subject first: no leading space
    ("The mother tongue of {} is", "Danielle Darrieux", "French"),
    ("The mother tongue of {} is", "Toko Yasuda", "Mandarin Chinese"),  # multi-token object
    ("{}'s creator is", "Apple A5", "Apple"),  # subject runs straight into punctuation
    ("Where is {}? It is in", "Autonomous University of Madrid", "Spain"),
]


def _tokenizers() -> list[tuple[str, object]]:
    return [("small-bos", small_tokenizer(bos=True)), ("small-nobos", small_tokenizer(bos=False))]


def _expected_last_subject_token(tok, text: str, span: tuple[int, int]) -> int:
    """Independent check: the prompt cut right after the subject ends with the same token."""
    upto = tok(text[: span[1]])["input_ids"]
    full = tok(text)["input_ids"]
    # Tokens before the subject's end are shared unless the last one merges with what follows;
    # either way the last subject token sits at len(upto) - 1.
    assert full[: len(upto) - 1] == upto[:-1]
    return len(upto) - 1


def _check(tok, padding_side: str) -> None:
    tok.padding_side = padding_side
    items = [render(t, s, prefix=p, answer=a) for t, s, a in CASES for p in ("", "Note that ")]
    batch = tokenize(tok, items)
    width = batch.input_ids.shape[1]
    for i, item in enumerate(items):
        ids = tok(item.text)["input_ids"]
        real = batch.attention_mask[i].nonzero().squeeze(1)
        shift = int(real[0])
        assert (shift == width - len(ids)) if padding_side == "left" else shift == 0
        assert batch.input_ids[i, real].tolist() == ids
        assert batch.position_ids[i, real].tolist() == list(range(len(ids)))
        want = _expected_last_subject_token(tok, item.text, item.subject_span)
        assert int(batch.subject_index[i]) == shift + want
        piece = tok.decode(ids[want])
        lo, hi = item.subject_span
        assert piece.strip() and piece.strip() in item.text[max(0, lo - 1) : hi + 2]
        assert int(batch.last_index[i]) == shift + len(ids) - 1
        if item.answer_start is not None:
            ans = batch.input_ids[i, batch.answer_mask[i]].tolist()
            assert tok.decode(ans).strip() == item.text[item.answer_start :].strip()
            assert int(batch.answer_mask[i].nonzero().min()) > int(batch.subject_index[i])
        if tok.bos_token_id in ids:
            assert ids[0] == tok.bos_token_id


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("which", [0, 1])
def test_small_tokenizer_positions(which: int, padding_side: str) -> None:
    _check(_tokenizers()[which][1], padding_side)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("bos", [True, False])
def test_llama3_tokenizer_positions(bos: bool, padding_side: str) -> None:
    tok = llama3_tokenizer(bos=bos)
    assert (tok("Paris")["input_ids"][0] == tok.bos_token_id) is bos
    _check(tok, padding_side)


def test_subject_tokenizes_differently_at_start_and_after_a_space() -> None:
    tok = llama3_tokenizer(bos=True)
    start = render("{} is", "Darrieux")
    middle = render("I met {} today", "Darrieux")
    # " Darrieux" and "Darrieux" are different token sequences in Llama-3.
    assert (
        tok(" Darrieux", add_special_tokens=False)["input_ids"]
        != tok("Darrieux", add_special_tokens=False)["input_ids"]
    )
    batch = tokenize(tok, [start, middle])
    for i, r in enumerate([start, middle]):
        upto = tok(r.text[: r.subject_span[1]])["input_ids"]
        shift = int(batch.attention_mask[i].nonzero().min())
        assert int(batch.subject_index[i]) == shift + len(upto) - 1


def test_padding_side_does_not_change_activations(tmp_path: Path) -> None:
    handle = ModelHandle.load(tiny_llama_dir(tmp_path / "m", layers=2), device="cpu")
    items = [render(t, s, answer=a) for t, s, a in CASES]
    layer = handle.layer_name(1)

    def at_subject(side: str) -> torch.Tensor:
        handle.tokenizer.padding_side = side
        batch = tokenize(handle.tokenizer, items)
        with torch.no_grad(), Trace(handle.model, layer, retain_output=True) as tr:
            handle.model(**batch.model_inputs())
        return tr.output[torch.arange(len(items)), batch.subject_index]

    alone = []
    for item in items:
        batch = tokenize(handle.tokenizer, [item])
        with torch.no_grad(), Trace(handle.model, layer, retain_output=True) as tr:
            handle.model(**batch.model_inputs())
        alone.append(tr.output[0, batch.subject_index[0]])
    alone_t = torch.stack(alone)
    assert torch.allclose(at_subject("left"), alone_t, atol=1e-5)
    assert torch.allclose(at_subject("right"), alone_t, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prompt_last_site_is_the_token_before_the_answer(padding_side: str) -> None:
    tok = small_tokenizer(bos=True)
    tok.padding_side = padding_side
    items = [render(t, s, answer=a, site="prompt_last") for t, s, a in CASES if a]
    batch = tokenize(tok, items)
    first_answer = batch.answer_mask.float().argmax(dim=1)
    assert (batch.subject_index == first_answer - 1).all()
    bare = tokenize(tok, [render(t, s, site="prompt_last") for t, s, _ in CASES])
    assert (bare.subject_index == bare.last_index).all()
    with pytest.raises(ValueError, match="edit site"):
        render("{} is", "x", site="object")


def test_render_keeps_braces_in_template_subject_and_answer() -> None:
    r = render("{x} and {} {{y}} are", "A{0}B", prefix="{p} ", answer="{z}")
    assert r.text == "{p} {x} and A{0}B {{y}} are {z}"
    assert r.text[r.subject_span[0] : r.subject_span[1]] == "A{0}B"
    assert r.text[r.answer_start :] == " {z}"
    # Only the first placeholder is the subject's; a template must have one.
    assert render("{} and {}", "S").text == "S and {}"
    with pytest.raises(ValueError, match="placeholder"):
        render("no placeholder {x}", "S")


@pytest.mark.parametrize("left", [True, False])
def test_pad_rows_counts_positions_per_row(left: bool) -> None:
    batch = pad_rows([[5, 6, 7], [8]], pad_id=0, left=left)
    if left:
        assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
        assert batch.shifts == [0, 2]
    else:
        assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
        assert batch.shifts == [0, 0]
    with pytest.raises(ValueError, match="no rows"):
        pad_rows([], pad_id=0, left=left)
