"""Choosing a gated memory's threshold by measurement: how well the gate separates a fact's
own prompts from everything else (editd.memory).

For facts that are not edited, their keys are read as the editor would (the mean over its
prefixes at the subject's last token, at the gate module) and embedded with the gate's
projection; then, at every token of
- each fact's paraphrase prompts: does its own key's gate open (at any position)?
- each fact's neighbourhood prompts (other subjects, same relation): does any fact's gate open?
- ordinary text: does any fact's gate open at that token?
A threshold trades the first (a user who asks in other words) against the other two (writes
where no edited subject is read, which is what wears a model down).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from editd.editing.keys import DEFAULT_PREFIXES, prompt_set, read_at_subject
from editd.editing.model import ModelHandle
from editd.editing.trace import TraceDict
from editd.facts import FactUpdate
from editd.memory import embed

# Text tokens at which some stored gate may open, at most: 1 in 1,000 tokens of ordinary text.
MAX_TEXT_FIRES = 0.001


@dataclass(frozen=True)
class Separation:
    threshold: float
    paraphrase_fires: float  # share of facts one of whose paraphrases opens its own gate
    neighbour_fires: float  # share of facts one of whose neighbourhood prompts opens any gate
    text_fires: float  # share of text tokens at which any gate opens
    facts: int
    text_tokens: int


@torch.no_grad()
def token_inputs(handle: ModelHandle, module: str, texts: Sequence[str]) -> list[torch.Tensor]:
    """`module`'s input at every token of each text after the leading special tokens,
    (n_tokens, d_in) float32 per text. The caller holds the read lock."""
    out = []
    bos = handle.tokenizer.bos_token_id
    for text in texts:
        ids = handle.tokenizer(text, return_tensors="pt").to(handle.device)
        with TraceDict(handle.model, [module], retain_input=True, stop=True) as td:
            handle.model(**ids, use_cache=False)
        x = td[module].input[0].float()
        lead = int((ids["input_ids"][0][:1] == bos).sum()) if bos is not None else 0
        out.append(x[lead:])  # no fact is read at BOS
    return out


def measure_separation(
    handle: ModelHandle,
    facts: Sequence[FactUpdate],
    texts: Sequence[str],
    module: str,
    projection: torch.Tensor,
    thresholds: Sequence[float],
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> list[Separation]:
    """The gate's firing rates at each threshold (see the module docstring)."""
    with handle.reading():
        keys = read_at_subject(
            handle, prompt_set(handle.tokenizer, list(facts), prefixes), inputs=[module]
        )[module]  # (d_in, n)
        stored = embed(keys.T, projection)  # (n, r)
        own = torch.full((len(facts),), -1.0)
        near = torch.full((len(facts),), -1.0)
        for i, fact in enumerate(facts):
            for x in token_inputs(handle, module, fact.paraphrase_prompts):
                own[i] = max(float(own[i]), float((embed(x, projection) @ stored[i]).max()))
            for x in token_inputs(handle, module, fact.neighborhood_prompts):
                near[i] = max(float(near[i]), float((embed(x, projection) @ stored.T).max()))
        text = torch.cat(
            [
                (embed(x, projection) @ stored.T).amax(dim=1)
                for x in token_inputs(handle, module, texts)
            ]
        )
    has_para = torch.tensor([bool(f.paraphrase_prompts) for f in facts])
    has_near = torch.tensor([bool(f.neighborhood_prompts) for f in facts])
    rows = []
    for tau in thresholds:
        rows.append(
            Separation(
                threshold=float(tau),
                paraphrase_fires=_share(own[has_para] >= tau),
                neighbour_fires=_share(near[has_near] >= tau),
                text_fires=_share(text >= tau),
                facts=len(facts),
                text_tokens=int(text.numel()),
            )
        )
    return rows


def choose_threshold(
    rows: Sequence[Separation], max_text_fires: float = MAX_TEXT_FIRES
) -> Separation:
    """The threshold that opens the most paraphrases net of neighbour fires, among those that
    open on at most `max_text_fires` of ordinary text tokens (the strictest one if none does)."""
    allowed = [r for r in rows if r.text_fires <= max_text_fires]
    if not allowed:
        return max(rows, key=lambda r: r.threshold)
    return max(allowed, key=lambda r: (r.paraphrase_fires - r.neighbour_fires, -r.threshold))


def _share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 0.0


@torch.no_grad()
def text_embeddings(
    handle: ModelHandle,
    module: str,
    projection: torch.Tensor,
    texts: Iterable[str],
    max_tokens: int,
) -> torch.Tensor:
    """The gate embeddings (`embed`) of `module`'s input at the tokens of `texts`, up to
    `max_tokens` of them, (n, r) float32: ordinary text as the gate sees it. Reads the
    model under its read lock."""
    parts: list[torch.Tensor] = []
    seen = 0
    with handle.reading():
        for text in _passages(texts):
            if seen >= max_tokens:
                break
            (x,) = token_inputs(handle, module, [text])
            x = x[: max_tokens - seen]
            parts.append(embed(x, projection).cpu())
            seen += x.shape[0]
    if not parts:
        raise ValueError("no text to calibrate the gate on")
    return torch.cat(parts)


# A raised threshold never goes above this: a fact must still open where its own subject is
# read, and paraphrase keys sit at a median similarity of 0.93 to their fact's key (docs/gated).
CEILING = 0.9


def _passages(texts: Iterable[str], chars: int = 1200) -> Iterator[str]:
    """`texts` joined into passages of about `chars` characters: one forward pass each instead
    of one per line (a C0 corpus may be thousands of short lines)."""
    buf: list[str] = []
    size = 0
    for text in texts:
        buf.append(text)
        size += len(text) + 1
        if size >= chars:
            yield "\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n".join(buf)


def calibrated_thresholds(
    keys: torch.Tensor,
    reference: torch.Tensor,
    floor: float,
    margin: float,
    chunk: int = 8192,
    ceiling: float = CEILING,
) -> torch.Tensor:
    """Per-fact thresholds (b,): the highest similarity of each embedded key (b, r) to the
    `reference` text embeddings (n, r), + `margin`, kept within [floor, max(floor, ceiling)].

    A key that resembles ordinary text (a generic subject, a common word's context) would
    open its block wherever such text is read; its threshold is raised above what the
    reference reaches, so it opens where its own subject is read and not on that text. Keys
    no reference token comes near keep `floor`.
    """
    keys = keys.to(torch.float32)
    peak = torch.full((keys.shape[0],), -1.0)
    for lo in range(0, reference.shape[0], chunk):
        part = reference[lo : lo + chunk].to(device=keys.device, dtype=torch.float32)
        peak = torch.maximum(peak, (part @ keys.T).amax(0).cpu())
    return (peak + margin).clamp(max=max(floor, ceiling)).clamp(min=floor)
