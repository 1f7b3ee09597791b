"""Train the built-in Llama on the world's corpus, on the CPU.

The loss is taken only on the object and the closing period: the model has to know facts, not
to predict invented names, and computing the LM head only at those positions roughly halves the
cost of a step on two cores.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 128
    intermediate_size: int = 1024
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    # (epochs, peak learning rate) per cycle of warm-up + cosine decay. Facts are memorised
    # slowly on two cores; a second, gentler cycle lifts the long tail of facts.
    cycles: tuple[tuple[int, float], ...] = ((14, 3e-3), (20, 2e-3))
    # After those cycles the MLPs grow to `grown_size` units and train on through
    # `grow_cycles`. The facts are learned at 1,024 wide (96 s an epoch on two cores, against
    # 205 s at 3,584); the width is for the editor: the wider a layer's input, the more edits
    # it takes before they disturb other facts (docs/study), and a Llama-3-8B's is 14,336.
    # 3,584 is as wide as the shipped model can be in float16 and stay under 20 MB.
    grown_size: int = 3584
    grow_cycles: tuple[tuple[int, float], ...] = ((2, 5e-4),)
    batch_size: int = 128
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0


def model_config(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig) -> LlamaConfig:
    """A Llama-3 architecture (RMSNorm, SwiGLU, RoPE, GQA) at toy size."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        # Tied like Llama-3.2-1B: keeps the shipped model small with a word-sized vocabulary.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """(token ids of BOS+prompt+" object.", index where the continuation starts)."""
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    full = tokenizer([f"{p} {o}." for p, o in examples])["input_ids"]
    out = []
    for p_ids, f_ids in zip(prompts, full, strict=True):
        # Byte-level BPE never merges across the space before the object, so the prompt's
        # tokens are a prefix of the full sentence's; checked because training silently
        # learning the wrong positions would be hard to notice.
        assert f_ids[: len(p_ids)] == p_ids, "prompt tokens are not a prefix of the sentence"
        out.append((f_ids, len(p_ids)))
    return out


def _batch(
    encoded: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    target = torch.zeros((len(encoded), width), dtype=torch.bool)  # position predicts a target
    for row, (seq, start) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        target[row, start - 1 : len(seq) - 1] = True
    return ids, attn, target


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def continuation_accuracy(
    model: LlamaForCausalLM, encoded: list[tuple[list[int], int]], pad_id: int, batch: int = 512
) -> float:
    """Share of examples whose whole continuation is the greedy (argmax) prediction."""
    model.eval()
    correct = 0
    for i in range(0, len(encoded), batch):
        ids, attn, target = _batch(encoded[i : i + batch], pad_id)
        logits = model(input_ids=ids, attention_mask=attn).logits  # (b, t, vocab)
        pred = logits.argmax(-1)[:, :-1]
        gold = ids[:, 1:]
        mask = target[:, :-1]
        wrong = ((pred != gold) & mask).any(dim=1)
        correct += int((~wrong).sum())
    model.train()
    return correct / max(1, len(encoded))


def train(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    cfg: TrainConfig,
    on_epoch: Callable[[int, LlamaForCausalLM], bool] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    *,
    model: LlamaForCausalLM | None = None,
    first_cycle: int = 0,
) -> LlamaForCausalLM:
    """Train through `cfg.cycles`, or, given a `model` saved after cycle k, from cycle k+1 on.

    Each cycle starts a fresh optimizer and its own warm-up and cosine decay (warm restarts):
    a model resumed at a cycle boundary continues exactly as an uninterrupted build would.
    """
    torch.manual_seed(cfg.seed)
    first_rng = random.Random(cfg.seed)
    if model is None:
        model = LlamaForCausalLM(model_config(tokenizer, cfg))
    model.train().requires_grad_(True)
    encoded = encode_examples(tokenizer, examples)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * sum(epochs for epochs, _ in cfg.cycles[first_cycle:])
    pad_id = tokenizer.pad_token_id
    done = 0
    epoch_no = sum(epochs for epochs, _ in cfg.cycles[:first_cycle])
    for cycle, (epochs, peak_lr) in enumerate(cfg.cycles):
        if cycle < first_cycle:
            continue
        rng = first_rng if cycle == 0 else random.Random(cfg.seed + cycle)
        opt = _optimizer(model, cfg)
        cycle_steps = steps_per_epoch * epochs
        step = 0
        for _ in range(epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                ids, attn, target = _batch(
                    [encoded[j] for j in order[i : i + cfg.batch_size]], pad_id
                )
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, cycle_steps, peak_lr, cfg.warmup_steps)
                hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
                logits = model.lm_head(hidden[target])  # (n_targets, vocab)
                labels = ids[:, 1:][target[:, :-1]]
                loss = torch.nn.functional.cross_entropy(logits, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                done += 1
                if progress is not None:
                    progress(done, total, loss.item())
            epoch_no += 1
            # The callback may stop training early once the model knows its world well enough.
            if on_epoch is not None and on_epoch(epoch_no - 1, model):
                model.eval().requires_grad_(False)
                return model
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def grow_mlps(model: LlamaForCausalLM, width: int, seed: int = 0) -> LlamaForCausalLM:
    """Widen every MLP to `width` units without changing what the model computes.

    New units get random gate/up rows at the scale of the trained ones and zero `down_proj`
    columns (Net2Net-style growth), so the grown model answers exactly as before and the new
    units learn from there. Random units rather than copies of trained ones: copies would add
    no new directions to the keys the editor solves over.
    """
    old = model.config.intermediate_size
    if width < old:
        raise ValueError(f"cannot grow MLPs of {old} units to {width}")
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            w = lin.weight
            new = torch.randn(width - old, w.shape[1], generator=gen, dtype=w.dtype) * w.std()
            lin.weight = torch.nn.Parameter(torch.cat([w, new.to(w.device)], 0))
            lin.out_features = width
        down = mlp.down_proj
        zeros = down.weight.new_zeros(down.weight.shape[0], width - old)
        down.weight = torch.nn.Parameter(torch.cat([down.weight, zeros], 1))
        down.in_features = width
    model.config.intermediate_size = width
    return model


def _optimizer(model: LlamaForCausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.cycles[0][1],
        betas=(0.9, 0.98),
    )


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
