"""Causal tracing (ROME, Meng et al. 2022, §2.1): which MLPs carry a fact at its subject.

Restricted to what chooses MEMIT's edit layers. For each fact with a true object:

1. clean run: p = P(first token of the true object | prompt);
2. corrupted run: Gaussian noise of std `noise` × std(embedding matrix entries) is added to the
   token embeddings of every subject token (the tokens overlapping the subject's characters),
   which makes p drop to p*;
3. restored runs: the corrupted run again, but with one site put back to its clean value at the
   subject's last token. The indirect effect of the site is p(restored) − p*.

Two kinds of site are traced per layer l, in the same forward:

- `mlp`: the output of the MLP module `<layer l>.mlp` (not the down-projection's input), over a
  window of layers around l. Window convention (ROME's `trace_important_window`): the layers
  `max(0, l − w//2) .. min(L, l + ⌈w/2⌉) − 1`, i.e. w layers starting w//2 before l, clipped at
  both ends (w = 1: l alone; w = 3: l−1, l, l+1; w = 10 (ROME's GPT-2 XL): l−5 .. l+4).
- `hidden`: the decoder layer's output hidden state (`<layer l>`), always layer l alone, as
  ROME's hidden-state trace does. Its effect at the last layer, when the subject ends the prompt,
  is the whole recovery p − p* by construction.

ROME scales the noise by 3 × the std of subject-token embeddings measured over a corpus; here it
is `noise` × the std of all entries of the input embedding matrix, which needs no corpus.

Cost: per fact, one forward of `samples + 1` rows (the clean row and the corrupted rows; the
clean activations are read from row 0, as ROME does), then one forward of `2 × samples` rows per
traced layer (MLP-window restores in the first half, hidden-state restores in the second), so
facts × (1 + layers) forwards in all, none longer than the prompt. Facts are not batched across
each other, so there is no padding. The noise of a fact is drawn once (float32, on the CPU, from
a `torch.Generator` seeded with `seed`, in fact order) and reused by every run of that fact, so
the restored and corrupted runs differ only by the restore. Math is float32; the model runs in
its own dtype and device.

The model's read lock is taken per fact (the caller must not hold it): a fact's runs all see one
weight version, and an edit waiting to be applied stalls serving for one fact's forwards only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editd.editing.model import ModelHandle
from editd.editing.subject import render, tokenize
from editd.editing.trace import EditFn, TraceDict, hidden_of
from editd.facts import FactUpdate


@dataclass(frozen=True)
class CausalTrace:
    """Mean indirect effects per traced layer, averaged over noise samples and then facts."""

    layers: tuple[int, ...]  # the traced layers, in the order of the effects
    mlp_effect: tuple[float, ...]  # restoring the MLP output (window around the layer)
    hidden_effect: tuple[float, ...]  # restoring the decoder layer's output hidden state
    clean_prob: float  # mean P(true object's first token) of the clean runs
    corrupted_prob: float  # the same with the subject's embeddings corrupted
    facts: int  # facts traced
    skipped: int  # facts without target_true
    samples: int
    noise_std: float  # the absolute std of the added noise
    window: int
    best_layer: int  # the layer of the largest mean MLP effect (ties → earliest)
    best_hidden_layer: int  # the same for the hidden-state effect

    def edit_layers(self, size: int) -> list[int]:
        """The `size` contiguous traced layers with the largest summed MLP effect."""
        return [self.layers[i] for i in pick_window(self.mlp_effect, size)]


def pick_window(effects: Sequence[float], size: int) -> list[int]:
    """Indices of the contiguous window of `size` entries with the largest sum (ties → earliest)."""
    if size < 1 or size > len(effects):
        raise ValueError(f"window size {size} does not fit {len(effects)} effects")
    best_start, best_sum = 0, -math.inf
    for start in range(len(effects) - size + 1):
        total = math.fsum(effects[start : start + size])
        if total > best_sum:
            best_start, best_sum = start, total
    return list(range(best_start, best_start + size))


def window_layers(layer: int, window: int, num_layers: int) -> list[int]:
    """The layers restored around `layer`: w//2 before it to ⌈w/2⌉ − 1 after, clipped."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    lo = max(0, layer - window // 2)
    hi = min(num_layers, layer - (-window // 2))
    return list(range(lo, hi))


def subject_token_range(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> range:
    """Indices of all tokens overlapping the character span (special tokens never do).

    The same overlap rule as `subject.subject_token_index`, whose result is this range's last
    index: a token that straddles a subject boundary (a leading space merged in, or the last
    piece merged with what follows) counts as a subject token.
    """
    start, end = span
    hits = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hits:
        raise ValueError(f"no token covers characters {start}..{end}")
    return range(hits[0], hits[-1] + 1)


@dataclass(frozen=True)
class _Prompt:
    inputs: dict[str, torch.Tensor]  # one row, the prompt only (no answer tokens, no padding)
    subject: range  # subject token positions
    site: int  # the subject's last token
    target: int  # the true object's first token id


def _prompt(handle: ModelHandle, fact: FactUpdate) -> _Prompt:
    assert fact.target_true is not None
    item = render(fact.prompt, fact.subject, answer=fact.target_true)
    batch = tokenize(handle.tokenizer, [item])
    answer_col = int(batch.answer_mask[0].nonzero()[0])
    offsets = handle.tokenizer(item.text, return_offsets_mapping=True, add_special_tokens=True)[
        "offset_mapping"
    ]
    subject = subject_token_range(offsets, item.subject_span)
    site = int(batch.subject_index[0])
    if subject[-1] != site:  # both use the same overlap rule on the same tokenization
        raise AssertionError(f"subject tokens {subject} do not end at {site}")
    device = handle.device
    inputs = {k: v[:, :answer_col].to(device) for k, v in batch.model_inputs().items()}
    return _Prompt(inputs, subject, site, int(batch.input_ids[0, answer_col]))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("the input embedding is not a submodule of the model")


def _target_prob(handle: ModelHandle, inputs: dict[str, torch.Tensor], target: int) -> torch.Tensor:
    """P(target) at the prompt's last token, per row (float32); only that column hits the head."""
    hidden = handle.model.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, -1]
    logits = handle.model.get_output_embeddings()(hidden).float()
    return torch.softmax(logits, dim=-1)[:, target]


def _add_noise(noise: torch.Tensor, positions: range, first_row: int) -> EditFn:
    """Add `noise` (rows, k, d) at `positions` of rows first_row.. (float32, cast back)."""

    def edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        rows = slice(first_row, first_row + noise.shape[0])
        cols = slice(positions.start, positions.stop)
        out[rows, cols] = (out[rows, cols].float() + noise).to(out.dtype)
        return out

    return edit


def _restore(clean: torch.Tensor, site: int, rows: slice) -> EditFn:
    """Put the clean hidden state (d,) back at `site` of the given rows."""

    def edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows, site] = clean.to(out.dtype)
        return out

    return edit


def _trace_fact(
    handle: ModelHandle,
    prompt: _Prompt,
    noise: torch.Tensor,
    layers: Sequence[int],
    window: int,
    embed: str,
    mlp_name: Callable[[int], str],
) -> tuple[float, float, list[float], list[float]]:
    """(clean p, mean corrupted p, MLP effects, hidden effects) of one fact."""
    model, n = handle.model, noise.shape[0]
    num_layers = handle.num_layers
    windows = {layer: window_layers(layer, window, num_layers) for layer in layers}
    mlps = sorted({m for w in windows.values() for m in w})
    names = [mlp_name(m) for m in mlps] + [handle.layer_name(layer) for layer in layers]

    # Row 0 clean, rows 1..n corrupted; the clean activations at the site come from row 0.
    inputs = {k: v.repeat(n + 1, 1) for k, v in prompt.inputs.items()}
    with (
        TraceDict(model, [embed], edit_output=_add_noise(noise, prompt.subject, 1)),
        TraceDict(model, names, retain_output=True) as td,
    ):
        probs = _target_prob(handle, inputs, prompt.target)
    clean = {name: hidden_of(td[name].output)[0, prompt.site].clone() for name in names}
    clean_p, corrupted_p = float(probs[0]), float(probs[1:].mean())

    # Rows 0..n-1 restore the MLP window, rows n..2n-1 the decoder layer's output.
    inputs = {k: v.repeat(2 * n, 1) for k, v in prompt.inputs.items()}
    both = noise.repeat(2, 1, 1)
    mlp_rows, hidden_rows = slice(0, n), slice(n, 2 * n)
    mlp_effect, hidden_effect = [], []
    for layer in layers:
        edits: dict[str, EditFn] = {embed: _add_noise(both, prompt.subject, 0)}
        for m in windows[layer]:
            edits[mlp_name(m)] = _restore(clean[mlp_name(m)], prompt.site, mlp_rows)
        name = handle.layer_name(layer)
        edits[name] = _restore(clean[name], prompt.site, hidden_rows)
        with TraceDict(model, list(edits), edit_output=edits):
            probs = _target_prob(handle, inputs, prompt.target)
        mlp_effect.append(float(probs[mlp_rows].mean()) - corrupted_p)
        hidden_effect.append(float(probs[hidden_rows].mean()) - corrupted_p)
    return clean_p, corrupted_p, mlp_effect, hidden_effect


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def causal_trace(
    handle: ModelHandle,
    facts: Sequence[FactUpdate],
    *,
    samples: int = 10,
    noise: float = 3.0,
    window: int = 1,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> CausalTrace:
    """Mean indirect effect of each layer's MLP (and hidden state) at the subject's last token.

    `layers` are the layers traced (default: all). Facts without `target_true` are skipped
    and counted. See the module docstring for the method, the window convention and the cost.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    num_layers = handle.num_layers
    traced = list(range(num_layers)) if layers is None else list(layers)
    if not traced or any(not 0 <= layer < num_layers for layer in traced):
        raise ValueError(f"layers must be a non-empty subset of 0..{num_layers - 1}: {traced}")
    window_layers(0, window, num_layers)  # validates the window
    usable = [f for f in facts if f.target_true is not None]
    if not usable:
        raise ValueError("no fact has a target_true to trace")

    model = handle.model
    embedding = model.get_input_embeddings()
    embed = _module_name(model, embedding)
    noise_std = noise * float(embedding.weight.detach().float().std())
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def mlp_name(layer: int) -> str:
        return f"{handle.layer_name(layer)}.mlp"

    cleans, corrupts = [], []
    mlp_sum = [0.0] * len(traced)
    hidden_sum = [0.0] * len(traced)
    for fact in usable:
        prompt = _prompt(handle, fact)
        d = embedding.weight.shape[1]
        draw = torch.randn((samples, len(prompt.subject), d), generator=gen, dtype=torch.float32)
        draw = (draw * noise_std).to(handle.device)
        with handle.reading(), torch.no_grad():
            clean_p, corrupted_p, mlp_e, hidden_e = _trace_fact(
                handle, prompt, draw, traced, window, embed, mlp_name
            )
        cleans.append(clean_p)
        corrupts.append(corrupted_p)
        mlp_sum = [a + b for a, b in zip(mlp_sum, mlp_e, strict=True)]
        hidden_sum = [a + b for a, b in zip(hidden_sum, hidden_e, strict=True)]

    n = len(usable)
    mlp_effect = tuple(s / n for s in mlp_sum)
    hidden_effect = tuple(s / n for s in hidden_sum)
    return CausalTrace(
        layers=tuple(traced),
        mlp_effect=mlp_effect,
        hidden_effect=hidden_effect,
        clean_prob=math.fsum(cleans) / n,
        corrupted_prob=math.fsum(corrupts) / n,
        facts=n,
        skipped=len(facts) - n,
        samples=samples,
        noise_std=noise_std,
        window=window,
        best_layer=traced[_argmax(mlp_effect)],
        best_hidden_layer=traced[_argmax(hidden_effect)],
    )
