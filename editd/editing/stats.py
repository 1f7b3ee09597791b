"""C0 = E[k kᵀ]: the second moment of an edited layer's inputs over a text corpus.

One forward pass over the corpus serves every edited layer (hooks on all of them, the forward
stopped after the deepest). Tokens are accumulated in float64 until the budget (default
10 × d_in, enough per "Efficient model editing" and measured here) is spent; BOS and other
special tokens are left out, since their activations are outliers no edit key resembles.
Results are cached as safetensors, keyed by model identity, module, corpus and budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from editd import durable
from editd.editing.model import ModelHandle
from editd.editing.subject import pad_rows, pad_token_id
from editd.editing.trace import TraceDict

log = logging.getLogger(__name__)

BUDGET_PER_DIM = 10


@dataclass(frozen=True)
class Corpus:
    """Texts for C0, with an identity that keys the cache.

    From a file: one text per line, or JSONL whose objects carry a "text" field. The identity
    of a file corpus is the sha256 of its bytes; of an in-memory one, of its texts.
    """

    texts: Sequence[str] | None = None
    path: Path | None = None
    name: str = ""

    @classmethod
    def from_path(cls, path: str | Path) -> Corpus:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stats corpus {path} does not exist")
        return cls(path=path, name=path.name)

    def __iter__(self) -> Iterator[str]:
        if self.texts is not None:
            yield from self.texts
            return
        assert self.path is not None
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        text = json.loads(line).get("text")
                    except json.JSONDecodeError:
                        text = line
                    if isinstance(text, str) and text.strip():
                        yield text
                else:
                    yield line

    @property
    def identity(self) -> str:
        h = hashlib.sha256()
        if self.texts is not None:
            for t in self.texts:
                h.update(t.encode("utf-8"))
                h.update(b"\0")
        else:
            assert self.path is not None
            with self.path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:16]


def default_budget(d_in: int) -> int:
    return BUDGET_PER_DIM * d_in


def cache_path(cache_dir: Path, model_id: str, module: str, corpus_id: str, tokens: int) -> Path:
    return cache_dir / f"c0-{model_id}-{module}-{corpus_id}-{tokens}.safetensors"


def layer_second_moments(
    handle: ModelHandle,
    modules: Sequence[str],
    corpus: Iterable[str],
    tokens: int,
    *,
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """E[k kᵀ] (float64, on the model's device) of each module's input; and tokens used.

    Modules must be given in forward order. The handle's read lock is taken for each chunk's
    forward pass, so a weight swap (an edit or rollback served meanwhile) waits for one chunk;
    the keys are the base model's whatever is served (`ModelHandle.base_view`: in this
    thread only, requests served meanwhile see the served weights). The caller must not hold the
    read lock (it is not re-entrant).
    """
    tok = handle.tokenizer
    specials = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    device = handle.device
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    bar = tqdm(total=tokens, unit="tok", desc="C0", file=sys.stderr, disable=not progress)
    texts = iter(corpus)
    pad = pad_token_id(tok)
    try:
        while seen < tokens:
            chunk = [t for _, t in zip(range(batch_size), texts, strict=False)]
            if not chunk:
                break
            enc = tok(chunk, truncation=True, max_length=max_length, add_special_tokens=True)
            padded = pad_rows(enc["input_ids"], pad, left=False)
            input_ids, mask, positions = (
                padded.input_ids,
                padded.attention_mask,
                padded.position_ids,
            )
            use = mask.bool() & ~torch.isin(input_ids, specials)
            with (
                handle.reading(),
                torch.no_grad(),
                handle.base_view(),
                TraceDict(handle.model, modules, retain_input=True, stop=True) as td,
            ):
                handle.model(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    use_cache=False,
                )
            take = int(use.sum())
            keep = use.to(device)
            if seen + take > tokens:
                # Spend the budget exactly, so the cache key describes what was used.
                flat = keep.reshape(-1).nonzero().squeeze(1)[: tokens - seen]
                keep = torch.zeros_like(keep.reshape(-1)).index_fill_(0, flat, True)
                keep = keep.reshape(use.shape)
                take = tokens - seen
            for name in modules:
                # One chunk's product in float32, the running sum in float64: a chunk adds a
                # few hundred tokens, well within float32, and a float64 matmul costs twice as
                # much on CPUs and ~30-60x on GPUs without fast float64 (d_in² per token).
                x = td[name].input[keep].float()  # (take, d_in)
                acc = (x.T @ x).to(torch.float64)  # (d_in, d_in)
                sums[name] = sums[name] + acc if name in sums else acc
            seen += take
            bar.update(take)
    finally:
        bar.close()
    if seen == 0:
        raise ValueError("the stats corpus produced no tokens")
    if seen < tokens:
        log.warning("stats corpus ran out after %d of %d tokens", seen, tokens)
    return {name: s / seen for name, s in sums.items()}, seen


class SecondMomentCache:
    """C0 per module, computed once per (model, module, corpus, budget) and kept on disk."""

    def __init__(self, cache_dir: str | Path, *, progress: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.progress = progress

    def get(
        self,
        handle: ModelHandle,
        modules: Sequence[str],
        corpus: Corpus,
        tokens: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """C0 (float64, CPU) for each module; computes the missing ones in one pass."""
        corpus_id = corpus.identity
        out: dict[str, torch.Tensor] = {}
        budgets: dict[str, int] = {}
        for m in modules:
            budgets[m] = tokens or default_budget(handle.weight(m).shape[1])
            p = cache_path(self.cache_dir, handle.identity, m, corpus_id, budgets[m])
            if p.is_file():
                out[m] = load_file(p)["c0"]
        missing = [m for m in modules if m not in out]
        by_budget: dict[int, list[str]] = {}
        for m in missing:
            by_budget.setdefault(budgets[m], []).append(m)
        for budget, group in by_budget.items():
            c0s, used = layer_second_moments(handle, group, corpus, budget, progress=self.progress)
            for m, c0 in c0s.items():
                c0 = c0.cpu()
                out[m] = c0
                p = cache_path(self.cache_dir, handle.identity, m, corpus_id, budget)
                _atomic_save({"c0": c0}, p, {"tokens": str(used), "corpus": corpus.name})
        return {m: out[m] for m in modules}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    durable.write_with(path, lambda tmp: save_file(contiguous, tmp, metadata=meta))
