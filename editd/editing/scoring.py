"""Scoring a model on facts: continuation log-probabilities and the CounterFact metrics.

Everything here reads the model and never changes it. An object is scored as the string that
follows its prompt in running text, `prompt + " " + object`, tokenized the way the tokenizer
splits that whole text; the prompt gets the tokenizer's own leading special tokens (BOS for
Llama-3) exactly once. Batches are padded on the tokenizer's `padding_side` and every position
is read through the attention mask, so left and right padding give the same numbers.

CounterFact semantics (Meng et al., ROME/MEMIT): a fact's object is scored by the mean per-token
log-probability of the whole object string. ES: the edit prompt prefers the new object over the
true one; PS: the same over paraphrase prompts; NS: neighbourhood prompts (other subjects whose
true object is this fact's old object) still prefer the true object. Per fact the share of its
prompts that pass, then the mean over facts, as ROME's `summarize.py` does.

Served accuracy (`served_accuracy`) asks what the model actually generates instead: greedy
decoding from each prompt, compared on token ids with the object as the teacher-forced scores
tokenize it, so a model that prefers the new object to the old one but says a third thing
scores ES 1 above and 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editd.editing.decoding import DEFAULT_BATCH_SIZE, greedy_continuations
from editd.editing.subject import leading_special_ids, pad_rows, pad_token_id, render
from editd.facts import FactUpdate


def join(prompt: str, obj: str) -> str:
    """How an object follows its prompt in text: one space between them."""
    return f"{prompt} {obj}"


def prompt_text(prompt: str, subject: str) -> str:
    """A paraphrase prompt as text: a template with `{}` is rendered with `subject.render`,
    whose brace rules hold (other braces kept, the subject inserted verbatim); a full text,
    as CounterFact's paraphrases are, is kept as it is."""
    return render(prompt, subject).text if "{}" in prompt else prompt


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str, prefix: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (with `prefix` once) and of the continuation as it follows it.

    The continuation's ids are the tail of the tokenization of the joined text when that text
    tokenizes as prompt-then-continuation (byte-level BPE with a space-led word does); otherwise
    the continuation is tokenized on its own, with its leading space.
    """
    if not continuation.strip():
        raise ValueError("continuation is empty")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(join(prompt, continuation), add_special_tokens=False)["input_ids"]
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        cont_ids = full_ids[len(prompt_ids) :]
    else:
        cont_ids = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
    # A prompt that already starts with BOS text must not get a second one.
    lead = list(prefix)
    if lead and prompt_ids[: len(lead)] == lead:
        lead = []
    return lead + list(prompt_ids), list(cont_ids)


@dataclass(frozen=True)
class _Scored:
    # Plain Python values, not tensors: tens of thousands of tiny tensors kept alive between
    # forward passes pinned the CPU heap, and scoring 2,000 facts grew RSS by 7 GB (flat
    # with tuples).
    logprobs: tuple[float, ...]  # per continuation token, float32 precision
    top1: tuple[bool, ...]  # the token is the argmax at its position


@torch.no_grad()
def score_ids(
    model: PreTrainedModel,
    prefixes: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int,
    padding_side: str = "right",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[_Scored]:
    """Teacher-forced log-probability and top-1 flag of each target token after its prefix."""
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[_Scored] = []
    try:
        # Sorting by length keeps padding (and wasted compute) small; results go back in order.
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(targets[i]))
        results: dict[int, _Scored] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            results.update(
                zip(
                    chunk,
                    _score_batch(
                        model,
                        [prefixes[i] for i in chunk],
                        [targets[i] for i in chunk],
                        pad_id,
                        padding_side,
                        device,
                    ),
                    strict=True,
                )
            )
        out = [results[i] for i in range(len(prefixes))]
    finally:
        model.train(was_training)
    return out


def _score_batch(
    model: PreTrainedModel,
    prefixes: list[Sequence[int]],
    targets: list[Sequence[int]],
    pad_id: int,
    padding_side: str,
    device: torch.device,
) -> list[_Scored]:
    for p, t in zip(prefixes, targets, strict=True):
        if not p or not t:
            raise ValueError("every sequence needs a non-empty prefix and target")
    # The last target token is only predicted, never fed.
    seqs = [list(p) + list(t[:-1]) for p, t in zip(prefixes, targets, strict=True)]
    batch = pad_rows(seqs, pad_id, left=padding_side == "left")
    offsets = batch.shifts
    logits = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    ).logits  # (batch, width, vocab)
    # Token t[j] is predicted at the position of the token before it; all predictions of the
    # batch go through one log-softmax and come back to the host in one copy.
    rows, cols, toks, lengths = [], [], [], []
    for row, (p, t) in enumerate(zip(prefixes, targets, strict=True)):
        first = offsets[row] + len(p) - 1
        rows += [row] * len(t)
        cols += range(first, first + len(t))
        toks += t
        lengths.append(len(t))
    at_rows = torch.tensor(rows, device=logits.device)
    at_cols = torch.tensor(cols, device=logits.device)
    sel = logits[at_rows, at_cols].float()  # (n_tokens, vocab)
    target = torch.tensor(toks, dtype=torch.long, device=sel.device)
    logp = sel.log_softmax(-1).gather(-1, target[:, None])[:, 0].tolist()
    top1 = (sel.argmax(-1) == target).tolist()
    out, at = [], 0
    for n in lengths:
        out.append(_Scored(logprobs=tuple(logp[at : at + n]), top1=tuple(top1[at : at + n])))
        at += n
    return out


def _score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int,
) -> list[_Scored]:
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    prefix = leading_special_ids(tokenizer)
    encoded = [
        encode_pair(tokenizer, p, c, prefix) for p, c in zip(prompts, continuations, strict=True)
    ]
    return score_ids(
        model,
        [e[0] for e in encoded],
        [e[1] for e in encoded],
        pad_id=pad_token_id(tokenizer),
        padding_side=getattr(tokenizer, "padding_side", "right") or "right",
        batch_size=batch_size,
    )


def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[torch.Tensor]:
    """Per-token log-probabilities (float32, CPU) of each continuation after its prompt."""
    scored = _score_pairs(model, tokenizer, prompts, continuations, batch_size)
    return [torch.tensor(s.logprobs, dtype=torch.float32) for s in scored]


def greedy_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[bool]:
    """Whether each continuation is the model's greedy completion: every token is the argmax."""
    scored = _score_pairs(model, tokenizer, prompts, continuations, batch_size)
    return [all(s.top1) for s in scored]


def canary_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    objects: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Share of (prompt, object) pairs the model completes greedily with the object."""
    if not prompts:
        raise ValueError("no canary prompts")
    hits = greedy_match(model, tokenizer, prompts, objects, batch_size)
    return sum(hits) / len(hits)


def heldout_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
) -> float:
    """Token-level perplexity over texts; each text's first token is given, the rest predicted.

    A tokenizer that adds BOS gets every real token predicted; one that does not loses the first
    token of each text, as is usual for such models.
    """
    lead = leading_special_ids(tokenizer)
    prefixes, targets = [], []
    for text in texts:
        ids = lead + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= 2:
            prefixes.append(ids[:1])
            targets.append(ids[1:])
    if not targets:
        raise ValueError("no text with at least two tokens")
    scored = score_ids(
        model,
        prefixes,
        targets,
        pad_id=pad_token_id(tokenizer),
        padding_side=getattr(tokenizer, "padding_side", "right") or "right",
        batch_size=batch_size,
    )
    nll = -math.fsum(lp for s in scored for lp in s.logprobs)
    count = sum(len(s.logprobs) for s in scored)
    return math.exp(nll / count)


@dataclass(frozen=True)
class Scores:
    """Edit quality over a set of facts; NaN where a component had no prompts.

    es/ps/ns: probability-ordering success (new over true; true over new for ns).
    *_magnitude: mean P(new) − P(true) (P(true) − P(new) for ns), P = exp(mean token logp).
    """

    es: float
    ps: float
    ns: float
    s: float
    es_magnitude: float
    ps_magnitude: float
    ns_magnitude: float
    facts: int
    skipped: int
    edit_prompts: int
    paraphrase_prompts: int
    neighborhood_prompts: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of the defined (non-NaN) values; 0 if any is 0, NaN if none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return math.nan
    if any(v <= 0 for v in defined):
        return 0.0
    return len(defined) / sum(1 / v for v in defined)


@dataclass(frozen=True)
class FactLogprobs:
    """Mean per-token log-probabilities of the new and true object on one fact's prompts."""

    edit: tuple[tuple[float, float], ...]  # ((new, true), ...) per prompt
    paraphrase: tuple[tuple[float, float], ...]
    neighborhood: tuple[tuple[float, float], ...]


def summarize(facts: Sequence[FactLogprobs], skipped: int = 0) -> Scores:
    """The CounterFact metrics from per-prompt mean log-probabilities (pure)."""

    def part(
        pairs_per_fact: list[tuple[tuple[float, float], ...]], keep_true: bool
    ) -> tuple[float, float, int]:
        success, magnitude, prompts = [], [], 0
        for pairs in pairs_per_fact:
            if not pairs:
                continue
            prompts += len(pairs)
            sign = -1.0 if keep_true else 1.0
            success.append(sum((sign * (n - t)) > 0 for n, t in pairs) / len(pairs))
            magnitude.append(sum(sign * (math.exp(n) - math.exp(t)) for n, t in pairs) / len(pairs))
        if not success:
            return math.nan, math.nan, 0
        return sum(success) / len(success), sum(magnitude) / len(magnitude), prompts

    es, es_m, n_e = part([f.edit for f in facts], keep_true=False)
    ps, ps_m, n_p = part([f.paraphrase for f in facts], keep_true=False)
    ns, ns_m, n_n = part([f.neighborhood for f in facts], keep_true=True)
    return Scores(
        es=es,
        ps=ps,
        ns=ns,
        s=harmonic_mean([es, ps, ns]),
        es_magnitude=es_m,
        ps_magnitude=ps_m,
        ns_magnitude=ns_m,
        facts=len(facts),
        skipped=skipped,
        edit_prompts=n_e,
        paraphrase_prompts=n_p,
        neighborhood_prompts=n_n,
    )


def fact_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[FactUpdate],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[FactLogprobs]:
    """Mean log-probabilities of new and true object on each fact's prompts.

    The "true" object of the neighbourhood prompts is `neighborhood_target` where a fact has
    one (their subjects' own object, when it is not this fact's old one) and `target_true`
    otherwise. Facts without `target_true` cannot be scored and must be filtered out by the
    caller.
    """
    if any(f.target_true is None for f in facts):
        raise ValueError("every fact needs target_true to be scored")
    prompts: list[str] = []
    objects: list[str] = []
    # (fact index, kind) per prompt, in the order the prompts were queued.
    where: list[tuple[int, str]] = []
    for i, fact in enumerate(facts):
        assert fact.target_true is not None
        groups = (
            ("edit", [fact.rendered_prompt], fact.target_true),
            (
                "paraphrase",
                [prompt_text(p, fact.subject) for p in fact.paraphrase_prompts],
                fact.target_true,
            ),
            # Neighbourhood prompts are about other subjects, so they come rendered.
            (
                "neighborhood",
                list(fact.neighborhood_prompts),
                fact.neighborhood_target or fact.target_true,
            ),
        )
        for kind, kind_prompts, true_object in groups:
            for prompt in kind_prompts:
                prompts += [prompt, prompt]
                objects += [fact.target_new, true_object]
                where.append((i, kind))
    logps = [s.logprobs for s in _score_pairs(model, tokenizer, prompts, objects, batch_size)]
    per_fact: list[dict[str, list[tuple[float, float]]]] = [
        {"edit": [], "paraphrase": [], "neighborhood": []} for _ in facts
    ]
    for j, (i, kind) in enumerate(where):
        new, true = logps[2 * j], logps[2 * j + 1]
        per_fact[i][kind].append((math.fsum(new) / len(new), math.fsum(true) / len(true)))
    return [
        FactLogprobs(
            edit=tuple(d["edit"]),
            paraphrase=tuple(d["paraphrase"]),
            neighborhood=tuple(d["neighborhood"]),
        )
        for d in per_fact
    ]


def score_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[FactUpdate],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Scores:
    """ES/PS/NS/S of the model on facts; facts without `target_true` are skipped and counted."""
    usable = [f for f in facts if f.target_true is not None]
    return summarize(
        fact_logprobs(model, tokenizer, usable, batch_size), skipped=len(facts) - len(usable)
    )


# --- Served accuracy: what the model says when it generates, not what it prefers. ----------


@dataclass(frozen=True)
class ServedScores:
    """Served (generated) accuracy over a set of facts; NaN where a set had no prompts.

    es/ps: share of edit/paraphrase prompts whose greedy continuation starts with the new
    object. ns: share of neighbourhood prompts whose continuation does not start with it (the
    edit did not leak). ns_true: share of neighbourhood prompts whose continuation starts with
    their true object (`neighborhood_target`, else `target_true`), the stricter figure; only
    facts that name such an object count towards it. Per fact the share of its prompts, then
    the mean over facts, as the teacher-forced `Scores` are aggregated.
    """

    es: float
    ps: float
    ns: float
    ns_true: float
    facts: int
    edit_prompts: int
    paraphrase_prompts: int
    neighborhood_prompts: int
    ns_true_prompts: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def served_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[FactUpdate],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> ServedScores:
    """What the model generates greedily on each fact's edit, paraphrase and neighbourhood prompts.

    A continuation "starts with" an object when its first k token ids are the object's ids as
    they follow the prompt (`encode_pair`, the teacher-forced scores' tokenization), k being
    the object's token count. By default each prompt generates as many tokens as the longest
    object it is compared with; `max_new_tokens` fixes that number instead, and an object
    longer than it is never matched (the model did not say it within the budget). The
    tokenizer is only read (batches are built here, left-padded), never reconfigured.
    """
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prefix = leading_special_ids(tokenizer)
    prompt_ids: list[list[int]] = []
    # Per prompt: (fact index, kind, new object ids, true object ids or None).
    items: list[tuple[int, str, list[int], list[int] | None]] = []
    for i, fact in enumerate(facts):
        true_neighbour = fact.neighborhood_target or fact.target_true
        groups = (
            ("edit", [fact.rendered_prompt]),
            ("paraphrase", [prompt_text(p, fact.subject) for p in fact.paraphrase_prompts]),
            ("neighborhood", list(fact.neighborhood_prompts)),
        )
        for kind, kind_prompts in groups:
            for prompt in kind_prompts:
                ids, new_ids = encode_pair(tokenizer, prompt, fact.target_new, prefix)
                true_ids = None
                if kind == "neighborhood" and true_neighbour is not None:
                    true_ids = encode_pair(tokenizer, prompt, true_neighbour, prefix)[1]
                prompt_ids.append(ids)
                items.append((i, kind, new_ids, true_ids))
    if max_new_tokens is not None:
        lengths = [max_new_tokens] * len(items)
    else:
        lengths = [max(len(new), len(true or ())) for _, _, new, true in items]
    generated = greedy_continuations(
        model, prompt_ids, lengths, pad_id=pad_token_id(tokenizer), batch_size=batch_size
    )

    def starts_with(tokens: list[int], obj: list[int]) -> bool:
        return len(tokens) >= len(obj) and tokens[: len(obj)] == obj

    hits: list[dict[str, list[bool]]] = [
        {"edit": [], "paraphrase": [], "neighborhood": [], "ns_true": []} for _ in facts
    ]
    for (i, kind, new_ids, true_ids), tokens in zip(items, generated, strict=True):
        said_new = starts_with(tokens, new_ids)
        hits[i][kind].append(not said_new if kind == "neighborhood" else said_new)
        if true_ids is not None:
            hits[i]["ns_true"].append(starts_with(tokens, true_ids))

    def part(kind: str) -> tuple[float, int]:
        shares = [sum(h[kind]) / len(h[kind]) for h in hits if h[kind]]
        prompts = sum(len(h[kind]) for h in hits)
        return (sum(shares) / len(shares) if shares else math.nan), prompts

    (es, n_e), (ps, n_p), (ns, n_n), (ns_true, n_t) = (
        part(k) for k in ("edit", "paraphrase", "neighborhood", "ns_true")
    )
    return ServedScores(
        es=es,
        ps=ps,
        ns=ns,
        ns_true=ns_true,
        facts=len(facts),
        edit_prompts=n_e,
        paraphrase_prompts=n_p,
        neighborhood_prompts=n_n,
        ns_true_prompts=n_t,
    )


CANARY_ANSWER_TOKENS = 4  # greedy tokens read to find the answer's first word


def own_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str | None]:
    """The model's own greedy answer to each prompt: the first word it generates.

    A real model's canary is its own behaviour, not a gold answer: the word is what
    `canary_accuracy` later checks is still the greedy completion. None where the model
    starts with no word (punctuation or a line break), which a canary leaves out.
    """
    lead = leading_special_ids(tokenizer)
    prefixes = [lead + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    outs = greedy_continuations(
        model,
        prefixes,
        [CANARY_ANSWER_TOKENS] * len(prompts),
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
    )
    answers: list[str | None] = []
    for ids in outs:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        words = text.split("\n", 1)[0].split()
        word = words[0].strip(".,;:!?\"'()") if words and text[:1] == " " else ""
        answers.append(word or None)
    return answers


def canary_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a canary on this model: its own first words, kept where the
    unedited model's greedy completion is that word as `canary_accuracy` tokenises it, so the
    unedited model scores 1 and a drop counts flips only. On SmolLM2-135M, 344 of the 360
    shipped prompts."""
    answers = own_answers(model, tokenizer, prompts, batch_size=batch_size)
    kept = [(p, a) for p, a in zip(prompts, answers, strict=True) if a is not None]
    hits = greedy_match(model, tokenizer, [p for p, _ in kept], [a for _, a in kept], batch_size)
    kept = [pair for pair, hit in zip(kept, hits, strict=True) if hit]
    return [p for p, _ in kept], [a for _, a in kept]
