"""Target values: the residual change at the edit site that makes each new object most likely.

For a batch of b facts one parameter δ (b, d) is added to the residual stream after the last
edited layer, at the edit site (the subject's last token by default), in every rendering of a
fact (its prompt under each context prefix, with the new object appended) and in a
"{subject} is a" prompt whose next-token distribution must stay close to the unedited model's
(KL), so the subject keeps its identity.
All facts share each forward/backward; a fact whose new object is top-1 with probability at
least `stop_prob` on all of its prompts stops moving (its rows leave the batch), so stragglers
get the remaining steps to themselves. A step replays only the layers after the edit layer
from the unedited pass's recorded inputs (tail.py), where the model allows it.

The optimiser works in units of each fact's hidden-state RMS (δ_f = u_f · rms(h_f)), so one
learning rate suits models whose residual scales differ by orders of magnitude; Adam with a
cosine-decayed rate, and ‖δ_f‖ clamped to `clamp_norm` · ‖h_f‖. Math is float32 whatever the
model's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editd.editing.keys import mean_per_fact
from editd.editing.model import ModelHandle
from editd.editing.subject import Rendered, TokenBatch, render, tokenize
from editd.editing.tail import DecoderTail
from editd.editing.trace import EditFn, Trace, TraceDict
from editd.facts import FactUpdate

log = logging.getLogger(__name__)

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class TargetConfig:
    steps: int = 100
    lr: float = 0.5
    final_lr_fraction: float = 0.1
    stop_prob: float = 0.9
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm: float = 4.0
    # The bare prompt only: on the built-in model (trained on one sentence per line), prefixed
    # prompts are out of distribution and a min-over-prompts stop was never met (8 facts,
    # 100 steps: 4/8 converged with DEFAULT_PREFIXES, 7/8 in ≤ 15 steps with the bare prompt).
    # Keys are still averaged over the editor's prefixes.
    prefixes: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class TargetResult:
    delta: torch.Tensor  # (b, d) float32: the residual change after the last edited layer
    prob: torch.Tensor  # (b,) mean over a fact's prompts of P(new object), at the end
    min_prob: torch.Tensor  # (b,) the lowest of those
    steps: torch.Tensor  # (b,) steps a fact took part in
    converged: torch.Tensor  # (b,) bool: met the stopping criterion


@dataclass(frozen=True)
class _Rows:
    batch: TokenBatch  # edit rows, then one KL row per fact
    fact_of_row: torch.Tensor  # (n_rows,)
    is_kl: torch.Tensor  # (n_rows,) bool


def _rows(
    tokenizer: object, facts: Sequence[FactUpdate], prefixes: Sequence[str], site: str
) -> _Rows:
    items: list[Rendered] = []
    owner: list[int] = []
    for i, f in enumerate(facts):
        for p in prefixes:
            items.append(render(f.prompt, f.subject, prefix=p, answer=f.target_new, site=site))
            owner.append(i)
    n_edit = len(items)
    for i, f in enumerate(facts):
        items.append(render(KL_TEMPLATE, f.subject, site=site))
        owner.append(i)
    is_kl = torch.arange(len(items)) >= n_edit
    return _Rows(tokenize(tokenizer, items), torch.tensor(owner), is_kl)


def _final_hidden(handle: ModelHandle, batch: TokenBatch) -> torch.Tensor:
    """The decoder's last (normed) hidden states, (n, T, d)."""
    return handle.model.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state


def _logits_at(
    handle: ModelHandle, batch: TokenBatch, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Next-token logits (float32) at the given (row, column) positions only.

    The LM head is applied to the selected hidden states rather than to every position: with
    a 128k vocabulary the full logits of a batch would dwarf the model's activations.
    """
    hidden = _final_hidden(handle, batch)[rows, cols]  # (k, d)
    return handle.model.get_output_embeddings()(hidden).float()  # (k, vocab)


@dataclass(frozen=True)
class _Positions:
    """Where losses are read in a (sub)batch: answer predictions and KL rows' last token."""

    ans_row: torch.Tensor  # (k,) row of each predicted answer token
    ans_col: torch.Tensor  # (k,) column whose logits predict it (the token before)
    ans_tok: torch.Tensor  # (k,) the answer token id
    kl_row: torch.Tensor  # (m,)
    kl_col: torch.Tensor  # (m,)

    @classmethod
    def of(cls, batch: TokenBatch, is_kl: torch.Tensor) -> _Positions:
        r, c = batch.answer_mask.nonzero(as_tuple=True)
        kl_row = is_kl.nonzero().squeeze(1)
        return cls(r, c - 1, batch.input_ids[r, c], kl_row, batch.last_index[kl_row])


def compute_targets(
    handle: ModelHandle,
    facts: Sequence[FactUpdate],
    layer: str,
    config: TargetConfig | None = None,
    *,
    site: str = "subject_last",
) -> TargetResult:
    """Optimise δ at the output of decoder layer `layer` for every fact at once.

    δ is added at the edit site (`subject.render`): where the keys are read, since that is
    where the weight update will act.

    Reads the model (the caller holds its read lock) and changes nothing in it: δ enters
    through a hook that lives only for each forward pass.
    """
    cfg = config or TargetConfig()
    device = handle.device
    b = len(facts)
    rows = _rows(handle.tokenizer, facts, cfg.prefixes, site)
    batch = rows.batch.to(device)
    fact_of_row = rows.fact_of_row.to(device)
    is_kl = rows.is_kl.to(device)
    all_rows = torch.arange(len(fact_of_row), device=device)

    # The unedited model: hidden scale at the site, the KL rows' next-token distribution, and
    # what replaying only the layers after `layer` needs (tail.py), checked against this pass.
    tail = DecoderTail.of(handle.model, handle.layer_names(), layer)
    with torch.no_grad(), Trace(handle.model, layer, retain_output=True) as tr:
        pos = _Positions.of(batch, is_kl)
        with tail.record(handle.model, layer) if tail else contextlib.nullcontext():
            final = _final_hidden(handle, batch)
        base_logits = handle.model.get_output_embeddings()(final[pos.kl_row, pos.kl_col]).float()
        if tail is not None and not tail.matches(final, batch.attention_mask):
            log.info(
                "replaying the layers after %s does not match the model; running it whole", layer
            )
            tail = None
    base_kl_logp = F.log_softmax(base_logits, dim=-1)  # (b, vocab), KL rows are in fact order
    h = tr.output[all_rows, batch.subject_index].float()  # (n_rows, d)
    h_norm = mean_per_fact(h.norm(dim=1, keepdim=True), fact_of_row, b)[0]  # (b,)
    d = h.shape[1]
    scale = (h_norm / math.sqrt(d)).clamp(min=1e-6)  # (b,) RMS of the hidden state

    u = torch.zeros(b, d, device=device, dtype=torch.float32)
    m = torch.zeros_like(u)
    v = torch.zeros_like(u)
    t_fact = torch.zeros(b, device=device, dtype=torch.long)
    active = torch.ones(b, dtype=torch.bool, device=device)
    prob = torch.zeros(b, device=device)
    min_prob = torch.zeros(b, device=device)
    converged = torch.zeros(b, dtype=torch.bool, device=device)
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    for step in range(cfg.steps + 1):
        act = active.nonzero().squeeze(1)
        if act.numel() == 0:
            break
        sel = all_rows[active[fact_of_row]]
        # The replay keeps the recorded width; a full forward drops columns of padding only.
        sub = batch.select(sel, trim=tail is None)
        sub_fact = fact_of_row[sel]
        sub_kl = is_kl[sel]
        pos = _Positions.of(sub, sub_kl)
        at = torch.arange(len(sel), device=device)

        u_var = u.detach().requires_grad_(step < cfg.steps)
        delta = u_var * scale[:, None]  # (b, d)

        def add_delta(out: torch.Tensor, inp: torch.Tensor | None = None) -> torch.Tensor:
            add = torch.zeros(out.shape, device=out.device, dtype=torch.float32)
            add = add.index_put((at, sub.subject_index), delta[sub_fact])  # noqa: B023
            return out + add.to(out.dtype)

        read_row = torch.cat([pos.ans_row, pos.kl_row])
        read_col = torch.cat([pos.ans_col, pos.kl_col])
        with torch.set_grad_enabled(step < cfg.steps):
            if tail is not None:
                final = tail(add_delta(tail.hidden[sel]), rows=sel)[read_row, read_col]
                logits = handle.model.get_output_embeddings()(final).float()
            else:
                with Trace(handle.model, layer, edit_output=add_delta):
                    logits = _logits_at(handle, sub, read_row, read_col)
        k = len(pos.ans_row)
        logp = F.log_softmax(logits[:k], dim=-1)  # (k, vocab)
        tok_logp = logp.gather(1, pos.ans_tok[:, None]).squeeze(1)  # (k,)
        top1 = logp.argmax(dim=1) == pos.ans_tok  # (k,)

        # Per prompt (row): mean token NLL, sequence probability, all tokens top-1.
        n_sub = len(sel)
        row_nll = torch.zeros(n_sub, device=device).index_add_(0, pos.ans_row, -tok_logp)
        row_len = torch.bincount(pos.ans_row, minlength=n_sub).clamp(min=1)
        row_prob = torch.exp(-row_nll.detach())
        row_top1 = _row_min(top1.float(), pos.ans_row, n_sub)
        edit_rows = ~sub_kl
        fact_rows = sub_fact[edit_rows]

        nll = mean_per_fact((row_nll / row_len)[edit_rows][:, None], fact_rows, b)[0]  # (b,)
        kl_logp = F.log_softmax(logits[k:], dim=-1)
        kl_facts = sub_fact[pos.kl_row]
        kl = torch.zeros(b, device=device)
        kl = kl.index_put(
            (kl_facts,),
            F.kl_div(kl_logp, base_kl_logp[kl_facts], log_target=True, reduction="none").sum(1),
        )
        decay = (delta.norm(dim=1) / h_norm) ** 2
        loss = (nll + cfg.kl_factor * kl + cfg.weight_decay * decay)[act].sum()

        # Stopping is judged before this step's update: the δ that met it is the one returned.
        p_mean = mean_per_fact(row_prob[edit_rows][:, None], fact_rows, b)[0]
        p_min = _row_min(row_prob[edit_rows], fact_rows, b)
        ok = _row_min(row_top1[edit_rows], fact_rows, b)
        prob[act] = p_mean[act]
        min_prob[act] = p_min[act]
        done = (ok > 0) & (p_min >= cfg.stop_prob) & active
        converged |= done
        if step == cfg.steps:
            break

        (grad,) = torch.autograd.grad(loss, u_var)
        upd = active & ~done
        lr = cfg.lr * _cosine(step, cfg.steps, cfg.final_lr_fraction)
        t_fact += upd.long()
        g = grad[upd]
        m[upd] = beta1 * m[upd] + (1 - beta1) * g
        v[upd] = beta2 * v[upd] + (1 - beta2) * g * g
        t = t_fact[upd].float()[:, None]
        m_hat = m[upd] / (1 - beta1**t)
        v_hat = v[upd] / (1 - beta2**t)
        u[upd] = u[upd] - lr * m_hat / (v_hat.sqrt() + eps)
        # Clamp ‖δ_f‖ ≤ clamp_norm · ‖h_f‖, i.e. ‖u_f‖ ≤ clamp_norm · √d.
        limit = cfg.clamp_norm * math.sqrt(d)
        norms = u.norm(dim=1, keepdim=True).clamp(min=1e-12)
        u = torch.where(norms > limit, u * (limit / norms), u)
        active &= ~done

    return TargetResult(
        delta=(u * scale[:, None]).detach(),
        prob=prob.detach(),
        min_prob=min_prob.detach(),
        steps=t_fact,
        converged=converged,
    )


def _row_min(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Minimum of `values` grouped by `index` into n slots (1.0 where a slot has none)."""
    out = torch.ones(n, device=values.device, dtype=values.dtype)
    return out.scatter_reduce(0, index, values, reduce="amin", include_self=True)


def _cosine(step: int, total: int, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


@torch.no_grad()
def object_probability(
    handle: ModelHandle,
    facts: Sequence[FactUpdate],
    *,
    prefixes: Sequence[str] = ("",),
    edits: dict[str, EditFn] | None = None,
    chunk_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """P(new object | prompt) per fact (mean over prefixes) and whether it is greedy top-1.

    `edits` (module name → output edit, e.g. `keys.update_hook`) lets a batch's update be
    checked before it is applied. The caller holds the model's read lock.
    """
    items = [
        render(f.prompt, f.subject, prefix=p, answer=f.target_new) for f in facts for p in prefixes
    ]
    owner = torch.arange(len(facts)).repeat_interleave(len(prefixes))
    probs, tops = [], []
    device = handle.device
    for lo in range(0, len(items), chunk_rows):
        batch = tokenize(handle.tokenizer, items[lo : lo + chunk_rows]).to(device)
        none = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=device)
        pos = _Positions.of(batch, none)
        with TraceDict(handle.model, list(edits or {}), edit_output=edits or {}):
            logits = _logits_at(handle, batch, pos.ans_row, pos.ans_col)
        logp = F.log_softmax(logits, dim=-1)
        tok = logp.gather(1, pos.ans_tok[:, None]).squeeze(1)
        n = batch.input_ids.shape[0]
        seq = torch.zeros(n, device=device).index_add_(0, pos.ans_row, tok)
        top = _row_min((logp.argmax(1) == pos.ans_tok).float(), pos.ans_row, n)
        probs.append(seq.exp().cpu())
        tops.append(top.cpu())
    prob = mean_per_fact(torch.cat(probs)[:, None], owner, len(facts))[0]
    top1 = mean_per_fact(torch.cat(tops)[:, None], owner, len(facts))[0] >= 1.0
    return prob, top1
