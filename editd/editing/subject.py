"""Tokenizing rendered prompts and finding the subject's last token in them.

Positions come from the fast tokenizer's character offsets, never from tokenizing the subject
on its own: a subject tokenizes differently at the start of a text than after a space, and a
BOS token may or may not be prepended (the tokenizer decides, through its post-processor).
Batches are padded on the tokenizer's `padding_side`, left or right; positions are reported in
padded coordinates and `position_ids` restart at 0 on each row's first real token, so a padded
row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from editd import config
from editd.editing.errors import UnplaceableFact


@dataclass(frozen=True)
class Rendered:
    """A text and the character span of its subject; `answer_start` marks an appended object."""

    text: str
    subject_span: tuple[int, int]
    answer_start: int | None = None


SITES = config.SITES


def render(
    template: str,
    subject: str,
    *,
    prefix: str = "",
    answer: str | None = None,
    site: str = "subject_last",
) -> Rendered:
    """`prefix + template` with `{}` replaced by the subject, and optionally " " + answer.

    The template is split on its one `{}` rather than `str.format`ted, so other braces in user
    text are kept as they are. `site` says which token the span marks (`TokenBatch.subject_index`
    then points at it): the subject's last token (MEMIT's site), or the prompt's last token,
    for models that look facts up where the object is predicted rather than at the subject.
    """
    if site not in SITES:
        raise ValueError(f"unknown edit site {site!r}; choose from {SITES}")
    before, sep, after = template.partition("{}")
    if not sep:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder")
    start = len(prefix) + len(before)
    text = prefix + before + subject + after
    span = (start, start + len(subject))
    if site == "prompt_last":
        stripped = len(text.rstrip())
        span = (stripped - 1, stripped)
    if answer is None:
        return Rendered(text, span)
    return Rendered(text + " " + answer.strip(), span, answer_start=len(text))


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch. `subject_index[i]`: the subject's last token in row i (padded coords).

    `answer_mask[i, j]` is true where token j of row i belongs to the appended answer, and
    `last_index[i]` is the last real token of row i.
    """

    input_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, T)
    position_ids: torch.Tensor  # (n, T)
    subject_index: torch.Tensor  # (n,)
    last_index: torch.Tensor  # (n,)
    answer_mask: torch.Tensor  # (n, T) bool

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def select(self, rows: torch.Tensor, *, trim: bool = True) -> TokenBatch:
        """The given rows; with `trim`, columns that are padding in all of them are dropped."""
        sub = [t[rows] for t in self._tensors()]
        if not trim:
            return TokenBatch(*sub)
        mask = sub[1]
        keep = mask.any(0)
        lo = int(keep.nonzero().min())
        hi = int(keep.nonzero().max()) + 1
        ids, am, pos, subj, last, ans = sub
        return TokenBatch(
            ids[:, lo:hi], am[:, lo:hi], pos[:, lo:hi], subj - lo, last - lo, ans[:, lo:hi]
        )


def subject_token_index(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> int:
    """Index of the last token overlapping the character span.

    Zero-width tokens (BOS, other specials: offsets (0, 0)) never overlap. A token that runs
    past the subject's end (the subject's last piece merged with what follows) still counts:
    it is the token where the model has read the whole subject.
    """
    start, end = span
    best = -1
    for j, (a, b) in enumerate(offsets):
        if a < end and b > start:
            best = j
    if best < 0:
        raise UnplaceableFact(f"no token covers characters {start}..{end}")
    return best


@dataclass(frozen=True)
class Padded:
    """Token-id rows in one batch; `shifts[i]` is the column of row i's first token."""

    input_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, T)
    position_ids: torch.Tensor  # (n, T)
    shifts: list[int]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> Padded:
    """Rows padded with `pad_id` to the longest one, on the left or on the right.

    `position_ids` count each row's own tokens from 0 (padding gets 0), so RoPE sees the
    positions a row would see alone whichever side is padded.
    """
    if not rows:
        raise ValueError("no rows to pad")
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    shifts: list[int] = []
    for i, row in enumerate(rows):
        shift = width - len(row) if left else 0
        sl = slice(shift, shift + len(row))
        input_ids[i, sl] = torch.tensor(list(row), dtype=torch.long)
        attention[i, sl] = 1
        positions[i, sl] = torch.arange(len(row))
        shifts.append(shift)
    return Padded(input_ids, attention, positions, shifts)


def tokenize(
    tokenizer: Any, items: Sequence[Rendered], *, max_length: int | None = None
) -> TokenBatch:
    """Tokenize rendered texts (with the tokenizer's own special tokens) into a padded batch."""
    if not items:
        raise ValueError("nothing to tokenize")
    enc = tokenizer(
        [r.text for r in items],
        return_offsets_mapping=True,
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    rows = enc["input_ids"]
    left = getattr(tokenizer, "padding_side", "right") == "left"
    padded = pad_rows(rows, pad_token_id(tokenizer), left=left)
    n, width = padded.input_ids.shape
    answer = torch.zeros((n, width), dtype=torch.bool)
    subject = torch.empty(n, dtype=torch.long)
    last = torch.empty(n, dtype=torch.long)
    for i, (ids, offsets, item) in enumerate(zip(rows, enc["offset_mapping"], items, strict=True)):
        shift = padded.shifts[i]
        subject[i] = shift + subject_token_index(offsets, item.subject_span)
        last[i] = shift + len(ids) - 1
        if item.answer_start is not None:
            cut = item.answer_start
            # Answer tokens are those ending past the prompt; the leading space belongs to them.
            flags = [b > cut and b > a for a, b in offsets]
            if not any(flags):
                raise UnplaceableFact(f"answer of {item.text!r} was truncated away")
            if flags[0] or subject[i] - shift >= flags.index(True):
                raise UnplaceableFact(f"answer of {item.text!r} merged into the prompt's tokens")
            answer[i, shift : shift + len(ids)] = torch.tensor(flags)
    return TokenBatch(
        padded.input_ids, padded.attention_mask, padded.position_ids, subject, last, answer
    )


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama-3, none for GPT-2)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def pad_token_id(tokenizer: Any) -> int:
    # Any id works: padded positions are masked out and never read.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
