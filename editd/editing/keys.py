"""Reading activations at the subject position: keys K and current residual values.

A fact is rendered once per context prefix; its key at a layer is the mean of that layer's
input at the subject's last token over the prefixes (ROME's context templates, but fixed
strings, so an edit is reproducible). Earlier layers' updates of the same batch can be
applied on the fly (`updates`), through hooks that add `x @ Δᵀ` to a module's output, so the
pipeline sees what the edited model will compute without ever writing a weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from editd.editing.model import ModelHandle
from editd.editing.subject import Rendered, TokenBatch, leading_special_ids, render, tokenize
from editd.editing.trace import EditFn, TraceDict
from editd.facts import FactUpdate
from editd.lowrank import LayerUpdate
from editd.memory import Gate, embed

# Short, neutral openings: they vary the left context the subject is read in without steering
# the prediction. "" keeps the bare prompt, the one users send.
DEFAULT_PREFIXES: tuple[str, ...] = ("", "Note that ", "It is known that ", "Fact: ")


@dataclass(frozen=True)
class PromptSet:
    """Each fact rendered under each prefix; `fact_of_row[i]` says which fact row i renders."""

    batch: TokenBatch
    fact_of_row: torch.Tensor  # (n_rows,)
    n_facts: int

    def to(self, device: torch.device) -> PromptSet:
        return PromptSet(self.batch.to(device), self.fact_of_row.to(device), self.n_facts)


def prompt_set(
    tokenizer: object,
    facts: Sequence[FactUpdate],
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    *,
    with_answer: bool = False,
    site: str = "subject_last",
) -> PromptSet:
    items: list[Rendered] = []
    owner: list[int] = []
    for i, fact in enumerate(facts):
        for prefix in prefixes:
            answer = fact.target_new if with_answer else None
            items.append(render(fact.prompt, fact.subject, prefix=prefix, answer=answer, site=site))
            owner.append(i)
    return PromptSet(tokenize(tokenizer, items), torch.tensor(owner), len(facts))


def update_hook(update: LayerUpdate) -> EditFn:
    """A module-output edit that adds the effect of a low-rank weight update: x @ (L R)ᵀ."""

    def edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        left = update.left.to(device=inp.device, dtype=torch.float32)
        right = update.right.to(device=inp.device, dtype=torch.float32)
        extra = (inp.float() @ right.T) @ left.T  # (n, T, d_out)
        return out + extra.to(out.dtype)

    return edit


def update_hooks(updates: Mapping[str, LayerUpdate], gate: Gate | None = None) -> dict[str, EditFn]:
    """Output edits that add each update's effect, as it will be served.

    Without `gate`, at every token (a weight delta). With one, only at the tokens where the
    gate opens, decided from the gate module's input in each forward pass and reused by the
    later modules, as `editd.memory` serves a block: solving a gated batch against writes that
    act everywhere would count on help at tokens (the subject's other words, the relation)
    that the served block never writes.
    """
    if gate is None:
        return {n: update_hook(u) for n, u in updates.items()}
    if not updates:
        return {}
    opened: list[torch.Tensor] = []  # this pass's decision (one forward at a time)

    def decide(inp: torch.Tensor) -> None:
        keys = gate.keys.to(device=inp.device, dtype=torch.float32)
        sims = embed(inp, gate.projection) @ keys.T  # (n, T, b)
        limits = gate.fact_thresholds().to(inp.device)
        opened[:] = [(sims >= limits).any(-1, keepdim=True)]  # (n, T, 1)

    def hook(update: LayerUpdate | None, decides: bool) -> EditFn:
        def edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
            if decides:
                decide(inp)
            if update is None or not opened or not bool(opened[0].any()):
                return out
            left = update.left.to(device=inp.device, dtype=torch.float32)
            right = update.right.to(device=inp.device, dtype=torch.float32)
            extra = ((inp.float() @ right.T) @ left.T) * opened[0]
            return out + extra.to(out.dtype)

        return edit

    names = {*updates, gate.module}
    return {n: hook(updates.get(n), n == gate.module) for n in names}


def mean_per_fact(values: torch.Tensor, fact_of_row: torch.Tensor, n_facts: int) -> torch.Tensor:
    """(n_rows, d) → (d, n_facts): the mean over each fact's rows, as columns."""
    d = values.shape[1]
    sums = torch.zeros(n_facts, d, dtype=values.dtype, device=values.device)
    sums.index_add_(0, fact_of_row, values)
    counts = torch.bincount(fact_of_row, minlength=n_facts).clamp(min=1).to(values.dtype)
    return (sums / counts[:, None]).T  # (d, n_facts)


def finish_order(model: torch.nn.Module) -> dict[str, int]:
    """Module name → rank in which its forward returns (children before their parent).

    Hooks fire when a forward returns, so this is the order that decides where a forward
    may stop: after a decoder layer, not after its MLP.
    """
    order: dict[str, int] = {}

    def visit(module: torch.nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        order[name] = len(order)

    visit(model, "")
    return order


def _traced_chunks(
    handle: ModelHandle,
    prompts: PromptSet,
    modules: Sequence[str],
    updates: Mapping[str, LayerUpdate],
    chunk_rows: int,
    *,
    inputs: bool,
    outputs: bool,
    gate: Gate | None = None,
) -> Iterator[tuple[TokenBatch, TraceDict]]:
    """Each chunk of `prompts` and a trace of `modules` over it, with `updates` applied
    (where `gate` opens, when one is given: `update_hooks`).

    Only updates upstream of the deepest traced module can matter, and the forward stops
    after it. `prompts` must already be on the model's device.
    """
    order = finish_order(handle.model)
    deepest = max(order[n] for n in modules)
    upstream = {n: u for n, u in updates.items() if order[n] <= deepest}
    edits = update_hooks(upstream, gate)
    wanted = sorted({*modules, *edits}, key=order.__getitem__)
    n = prompts.batch.input_ids.shape[0]
    for lo in range(0, n, chunk_rows):
        idx = torch.arange(lo, min(n, lo + chunk_rows), device=handle.device)
        sub = prompts.batch.select(idx)
        with TraceDict(
            handle.model,
            wanted,
            retain_input=inputs,
            retain_output=outputs,
            edit_output=edits,
            stop=True,
        ) as td:
            handle.model(**sub.model_inputs(), use_cache=False)
        yield sub, td


@torch.no_grad()
def read_at_subject(
    handle: ModelHandle,
    prompts: PromptSet,
    *,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    updates: Mapping[str, LayerUpdate] | None = None,
    gate: Gate | None = None,
    chunk_rows: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-fact means of module inputs/outputs at the subject token, float32, (d, n_facts).

    `inputs` and `outputs` name modules (an output of a decoder layer is the residual stream
    after it). The caller holds the model's read lock.
    """
    prompts = prompts.to(handle.device)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in [*inputs, *outputs]}
    chunks = _traced_chunks(
        handle,
        prompts,
        [*inputs, *outputs],
        updates or {},
        chunk_rows,
        inputs=bool(inputs),
        outputs=bool(outputs),
        gate=gate,
    )
    for sub, td in chunks:
        at = torch.arange(sub.input_ids.shape[0], device=handle.device)
        for name in inputs:
            rows[name].append(td[name].input[at, sub.subject_index].float())
        for name in outputs:
            rows[name].append(td[name].output[at, sub.subject_index].float())
    return {
        name: mean_per_fact(torch.cat(parts), prompts.fact_of_row, prompts.n_facts)
        for name, parts in rows.items()
    }


@torch.no_grad()
def read_after_subject(
    handle: ModelHandle,
    prompts: PromptSet,
    module: str,
    *,
    updates: Mapping[str, LayerUpdate] | None = None,
    gate: Gate | None = None,
    chunk_rows: int = 64,
) -> torch.Tensor:
    """Inputs of `module` at every real token after the subject, float32, (d_in, m).

    These are the keys of the prompt's own relation words ("was born in"). A weight update
    that moves them moves the very positions that read the edited subject and predict the
    object; the editor holds them fixed. The caller holds the model's read lock.
    """
    prompts = prompts.to(handle.device)
    parts: list[torch.Tensor] = []
    chunks = _traced_chunks(
        handle, prompts, [module], updates or {}, chunk_rows, inputs=True, outputs=False, gate=gate
    )
    for sub, td in chunks:
        cols = torch.arange(sub.input_ids.shape[1], device=handle.device)[None, :]
        after = (cols > sub.subject_index[:, None]) & (cols <= sub.last_index[:, None])
        after &= sub.attention_mask.bool() & ~sub.answer_mask
        parts.append(td[module].input[after].float())
    return torch.cat(parts).T  # (d_in, m)


@torch.no_grad()
def read_anchors(handle: ModelHandle, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inputs of `modules` at the special tokens every text starts with (BOS), (d_in, a).

    Every position of every prompt attends to BOS (it is where attention heads rest), and C0
    leaves BOS out, so nothing else stops an update from moving its MLP outputs; the editor
    holds these keys fixed. A tokenizer that prepends nothing gives (d_in, 0). The caller
    holds the model's read lock.
    """
    lead = leading_special_ids(handle.tokenizer)
    if not lead:
        return {
            n: handle.weight(n).new_zeros(handle.weight(n).shape[1], 0).float() for n in modules
        }
    ids = torch.tensor([lead], device=handle.device)
    positions = torch.arange(len(lead), device=handle.device)[None]
    order = finish_order(handle.model)
    with TraceDict(
        handle.model, sorted(modules, key=order.__getitem__), retain_input=True, stop=True
    ) as td:
        handle.model(input_ids=ids, position_ids=positions, use_cache=False)
    return {n: td[n].input[0].float().T for n in modules}
