"""Which text a model's C0 is computed from.

C0 must describe the keys the model sees in ordinary use. The built-in world model was trained
on its world's sentences, so they are its ordinary text. A real model without a configured
corpus (`editing.stats_corpus`) gets text it generates itself from short, generic seeds: no
dataset has to ship or be downloaded, and the text is by construction in the model's own
distribution. The generated text is kept in the C0 cache directory, so it is made once per
model.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus, default_budget
from editd.world.builtin import is_builtin

log = logging.getLogger(__name__)

# Openings of ordinary prose, none about a particular fact, written for this project.
SEEDS: tuple[str, ...] = (
    "The",
    "In the",
    "It was",
    "A",
    "When",
    "There are",
    "One of the",
    "According to",
    "The history of",
    "In 1998,",
    "After the war,",
    "The city",
    "Scientists",
    "Many people",
    "The company",
    "During the",
    "Although",
    "This is",
    "The first",
    "Today,",
    "In his",
    "She was",
    "The book",
    "The river",
    "Most",
    "In recent years,",
    "The government",
    "The team",
    "Children",
    "The song",
    "Researchers",
    "The village",
    "As a result,",
    "The game",
    "On the other hand,",
    "The church",
    "The album",
    "Water",
    "The film",
    "The school",
    "He was born in",
    "The word",
    "The language",
    "In music,",
    "The museum",
    "Every year,",
    "The island",
    "The station",
    "In science,",
    "The road",
)

GENERATED_LENGTH = 128  # new tokens per text


def builtin_world_corpus() -> Corpus:
    """The built-in world's own sentences, in a fixed shuffle so any budget is a fair sample."""
    from editd.world.world import load_world

    texts = list(load_world().corpus())
    random.Random(0).shuffle(texts)
    return Corpus(texts=tuple(texts), name="builtin-world")


@torch.no_grad()
def generate_texts(
    handle: ModelHandle,
    tokens: int,
    *,
    seeds: Sequence[str] = SEEDS,
    length: int = GENERATED_LENGTH,
    batch_size: int = 32,
    seed: int = 0,
) -> list[str]:
    """At least `tokens` tokens of text sampled from the model (temperature 1, top-p 0.95).

    Reads the model under its read lock and leaves it unchanged. Deterministic for a seed on
    one device: the global RNG is forked, not advanced.
    """
    tok = handle.tokenizer
    texts: list[str] = []
    made = 0
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    saved_side = tok.padding_side
    with torch.random.fork_rng(devices=[]), handle.reading():
        torch.manual_seed(seed)
        try:
            tok.padding_side = "left"
            while made < tokens:
                prompts = [rng.choice(seeds) for _ in range(batch_size)]
                enc = tok(prompts, return_tensors="pt", padding=True).to(handle.device)
                out = handle.model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_p=0.95,
                    top_k=0,
                    max_new_tokens=length,
                    pad_token_id=pad,
                )
                for row in out:
                    text = tok.decode(row, skip_special_tokens=True).strip()
                    if text:
                        texts.append(text)
                        made += len(tok(text, add_special_tokens=False).input_ids)
        finally:
            tok.padding_side = saved_side
    return texts


MODEL_CORPUS_FILE = "c0-corpus.txt"  # a model directory's own C0 text (editd model fetch)


def write_generated(handle: ModelHandle, path: Path, tokens: int) -> Path:
    """Generate at least `tokens` tokens of the model's own text into `path`, atomically."""
    log.info("generating %d tokens of the model's own text for C0", tokens)
    texts = generate_texts(handle, tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # One text per line: the corpus reader splits on lines.
    tmp.write_text("".join(" ".join(t.split()) + "\n" for t in texts), encoding="utf-8")
    tmp.replace(path)
    return path


def generated_corpus(handle: ModelHandle, cache_dir: Path, tokens: int) -> Corpus:
    """Self-generated text for C0, made once per model and kept in `cache_dir`."""
    path = Path(cache_dir) / f"selfgen-{handle.identity}-{tokens}.txt"
    if not path.is_file():
        write_generated(handle, path, tokens)
    return Corpus.from_path(path)


def generated_budget(handle: ModelHandle, tokens: int | None = None) -> int:
    """Tokens of generated text C0 needs: its budget for down_proj's input width, plus a
    quarter for the seeds' own tokens (C0 leaves out special tokens only)."""
    d_in = int(getattr(handle.config, "intermediate_size", None) or handle.config.hidden_size)
    budget = tokens or default_budget(d_in)
    return budget + budget // 4


def stats_corpus(
    handle: ModelHandle,
    *,
    configured: Path | None,
    cache_dir: Path,
    tokens: int | None = None,
) -> Corpus:
    """The C0 corpus for `handle`: the configured file, the world's text, the model
    directory's own `c0-corpus.txt`, or text generated now (once, into `cache_dir`)."""
    if configured is not None:
        return Corpus.from_path(configured)
    if is_builtin(handle.path):
        return builtin_world_corpus()
    own = handle.path / MODEL_CORPUS_FILE if handle.path is not None else None
    if own is not None and own.is_file():
        return Corpus.from_path(own)
    return generated_corpus(handle, cache_dir, generated_budget(handle, tokens))
