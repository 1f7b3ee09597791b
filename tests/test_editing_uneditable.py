"""A model whose MLP output is normalised before the residual add is refused, not damaged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from editd.editing.editor import Editor, EditorConfig, UneditableModel
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus
from tests.editing_support import small_tokenizer, tiny_llama_dir


def _gemma2_dir(path: Path) -> Path:
    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_post_feedforward_norm_is_refused_with_the_reason(tmp_path: Path) -> None:
    handle = ModelHandle.load(_gemma2_dir(tmp_path / "gemma2"), device="cpu", dtype="float32")
    assert handle.mlp_output_norm(1) == "model.layers.1.post_feedforward_layernorm"
    with pytest.raises(UneditableModel, match="post_feedforward_layernorm normalises the MLP"):
        Editor(handle, EditorConfig(layers=(1, 2)), corpus=Corpus(texts=("a b",)), progress=False)


def test_a_llama_block_adds_its_mlp_output_as_it_is(tmp_path: Path) -> None:
    handle = ModelHandle.load(tiny_llama_dir(tmp_path / "llama"), device="cpu", dtype="float32")
    assert all(handle.mlp_output_norm(i) is None for i in range(handle.num_layers))
    Editor(handle, EditorConfig(layers=(1, 2)), corpus=Corpus(texts=("a b",)), progress=False)
