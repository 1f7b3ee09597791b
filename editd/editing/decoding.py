"""The one KV-cached decoder: served generation and served scoring both continue prompts with it.

`Decoder.prefill` runs one forward over a batch of prompts, left-padded with an attention mask
and `position_ids` that count each row's own tokens, so a row decodes what it would alone;
`Rows.advance` feeds every row one token and reads the next logits from the KV cache. What is
chosen from the logits is the caller's: `greedy_continuations` (the served ES/PS and the canary)
takes the argmax (`greedy_token`), the HTTP server's `editd.daemon.generation` takes the argmax
at temperature 0 (the same function) or samples, one row per choice, stepped under its read
lock so that one response is computed with one model version.

The keyword arguments a model's `forward` takes for the KV cache and for reading only the last
position's logits differ between transformers releases; `Decoder` asks the model once, here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from editd.editing.subject import pad_rows

# Rows per forward when scoring reads the model (greedy here, teacher-forced in scoring.py).
DEFAULT_BATCH_SIZE = 64


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice over the last dimension of `logits` (the first index on a tie)."""
    return logits.argmax(-1)


class Decoder:
    """A model's KV-cached forward: `prefill` over prompts, then `Rows.advance` one token."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed the KV-cache argument `past_key_values` to `cache`; ask the
        # model's forward which one it takes instead of pinning a version.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are read while decoding; older releases call the
        # argument num_logits_to_keep, and a model without it returns every position's.
        self.keep: dict[str, int] = next(
            ({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params),
            {},
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefill(
        self, prefixes: Sequence[Sequence[int]], *, pad_id: int = 0, every_position: bool = False
    ) -> Rows:
        """The forward over `prefixes` (left-padded with `pad_id` when their lengths differ).

        `every_position`: also keep the logits of every prompt position (`Rows.prompt_logits`,
        for prompt log-probabilities); otherwise only the last position's are computed.
        """
        if not prefixes or any(not p for p in prefixes):
            raise ValueError("every prefix needs at least one token")
        batch = pad_rows(prefixes, pad_id, left=True)  # every row ends in the last column
        device = self.device
        mask, positions = batch.attention_mask.to(device), batch.position_ids.to(device)
        out = self.model(
            input_ids=batch.input_ids.to(device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **({} if every_position else self.keep),
        )
        return Rows(self, out, mask, positions, every_position)


class Rows:
    """A batch being decoded: its KV cache, and `logits`, the next token's per row (batch, vocab).

    Not thread-safe; whoever steps it holds what keeps the weights still between steps.
    """

    def __init__(
        self,
        decoder: Decoder,
        out: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        every_position: bool,
    ):
        self._decoder = decoder
        self._past = out[decoder.cache_arg]
        self._mask = mask
        self._positions = positions
        self.logits: torch.Tensor = out.logits[:, -1]
        # (batch, t, vocab), left-padded as the prompts were; only with every_position.
        self.prompt_logits: torch.Tensor | None = out.logits if every_position else None

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each row its next token (`tokens`: (batch,)); `logits` become the following."""
        d = self._decoder
        self._positions = self._positions[:, -1:] + 1
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], -1)
        out = d.model(
            input_ids=tokens.reshape(-1, 1).to(self._mask.device),
            attention_mask=self._mask,
            position_ids=self._positions,
            use_cache=True,
            **d.keep,
            **{d.cache_arg: self._past},
        )
        self._past = out[d.cache_arg]
        self.logits = out.logits[:, -1]
        self.prompt_logits = None


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[int]]:
    """The first `lengths[i]` tokens the model generates greedily after `prefixes[i]`.

    Decoding is argmax at every step, with no stop on EOS (a caller compares a fixed number of
    tokens). Rows are decoded in batches by `Decoder`, so a row generates what it would alone.
    """
    if len(prefixes) != len(lengths):
        raise ValueError(f"{len(prefixes)} prefixes but {len(lengths)} lengths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for p, n in zip(prefixes, lengths, strict=True):
        if not p:
            raise ValueError("every prefix needs at least one token")
        if n < 1:
            raise ValueError(f"every continuation needs at least one token, got {n}")
    decoder = Decoder(model)
    was_training = model.training
    model.eval()
    results: dict[int, list[int]] = {}
    try:
        # Rows of one batch run to the batch's longest continuation; sorting by that length
        # (then by prompt length) keeps both the extra steps and the padding small.
        order = sorted(range(len(prefixes)), key=lambda i: (lengths[i], len(prefixes[i])))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = decoder.prefill([prefixes[i] for i in chunk], pad_id=pad_id)
            tokens = [greedy_token(rows.logits)]  # (batch,) per step
            for _ in range(max(lengths[i] for i in chunk) - 1):
                rows.advance(tokens[-1])
                tokens.append(greedy_token(rows.logits))
            for i, row in zip(chunk, torch.stack(tokens, dim=1).tolist(), strict=True):
                results[i] = row[: lengths[i]]
    finally:
        model.train(was_training)
    return [results[i] for i in range(len(prefixes))]
