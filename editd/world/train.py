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
    epochs: int = 12
    batch_size: int = 256
    lr: float = 3e-3
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
        tie_word_embeddings=False,
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


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    on_epoch: Callable[[int, LlamaForCausalLM], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = LlamaForCausalLM(model_config(tokenizer, cfg))
    model.train()
    encoded = encode_examples(tokenizer, examples)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step = 0
    pad_id = tokenizer.pad_token_id
    for epoch in range(cfg.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            ids, attn, target = _batch([encoded[j] for j in order[i : i + cfg.batch_size]], pad_id)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = model.lm_head(hidden[target])  # (n_targets, vocab)
            labels = ids[:, 1:][target[:, :-1]]
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress(step, total, float(loss))
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return model


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
