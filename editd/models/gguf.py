"""Convert a Llama-family GGUF file into a plain Hugging Face model directory.

transformers reads GGUF (with `gguf` installed) by dequantising every tensor to float32, but
refuses `save_pretrained` on the result, and re-reading the GGUF on every start costs about
30 s. The directory written here is what production loads: float32 safetensors (a dequantised
Q4 weight is exact in float32 and would be rounded in bfloat16), `config.json` without the
GGUF quantisation entry, the tokenizer and the generation config. The conversion is checked
before it is published: the written directory is reloaded and its logits must equal the
GGUF model's bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from editd.models.profile import PROFILE_FILE

log = logging.getLogger(__name__)

# Prompts the conversion check runs through both models; any text works, these are short.
CHECK_PROMPTS = ("The capital of France is", "The mother tongue of Danielle Darrieux is")


class GGUFImportError(RuntimeError):
    """The GGUF file cannot be converted; the message says why and what to do."""


Progress = Callable[[str], None]


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError as exc:  # pragma: no cover - the package depends on it
        raise GGUFImportError(
            "reading GGUF needs the `gguf` package: pip install gguf accelerate"
        ) from exc


def load_gguf(file: Path) -> tuple[Any, Any]:
    """The model (float32, eval) and tokenizer that transformers reads from `file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    file = Path(file)
    if not file.is_file():
        raise GGUFImportError(f"{file}: no such GGUF file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError) as exc:
        raise GGUFImportError(f"{file}: transformers cannot read it as a causal LM: {exc}") from exc
    return model.eval().requires_grad_(False), tokenizer


def _state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer once; a tied output head is left to the config."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        if "rotary_emb" in name:
            continue  # recomputed from the config at load
        ptr = t.data_ptr()
        if ptr in seen:
            continue  # tied (lm_head = embed_tokens): safetensors refuses shared storage
        seen[ptr] = name
        tensors[name] = t.detach().contiguous().clone()
    return tensors


def _config_dict(model: Any) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    return config


@torch.no_grad()
def _logits(model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt")).logits for p in prompts]


def write_hf_dir(model: Any, tokenizer: Any, out: Path) -> None:
    """Write `model` and `tokenizer` as a Hugging Face directory at `out` (which must not exist)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_config_dict(model), indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_identical(model: Any, tokenizer: Any, out: Path) -> None:
    """Reload `out` and require logits bit-identical to `model`'s on CHECK_PROMPTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    retok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for prompt in CHECK_PROMPTS:
        if tokenizer(prompt).input_ids != retok(prompt).input_ids:
            raise GGUFImportError(f"the written tokenizer encodes {prompt!r} differently")
    for a, b in zip(
        _logits(model, tokenizer, CHECK_PROMPTS),
        _logits(reloaded.eval(), retok, CHECK_PROMPTS),
        strict=True,
    ):
        if not torch.equal(a, b):
            diff = (a - b).abs().max().item()
            raise GGUFImportError(f"the written model's logits differ from the GGUF's (max {diff})")


def import_gguf(
    file: Path,
    out: Path,
    *,
    profile: dict[str, Any] | None = None,
    force: bool = False,
    progress: Progress = lambda msg: log.info("%s", msg),
) -> Path:
    """Convert `file` into a Hugging Face directory at `out`; returns `out`.

    The directory appears whole or not at all: it is written beside `out` under a temporary
    name, checked (`check_identical`) and renamed. `profile`, when given, is written as the
    model's `editd.json` (its editing defaults). An existing `out` is an error unless `force`.
    """
    file, out = Path(file), Path(out)
    if out.exists() and not force:
        raise GGUFImportError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    progress(f"reading {file.name} (dequantising to float32)")
    model, tokenizer = load_gguf(file)
    arch = getattr(model.config, "model_type", "?")
    progress(f"read a {arch} model with {model.config.num_hidden_layers} layers")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        progress(f"writing {staged.name}: safetensors, config, tokenizer")
        write_hf_dir(model, tokenizer, staged)
        if profile is not None:
            (staged / PROFILE_FILE).write_text(json.dumps(profile, indent=2) + "\n")
        progress("checking the written model's logits against the GGUF's")
        check_identical(model, tokenizer, staged)
        for f in staged.iterdir():
            f.chmod(0o644)  # readable by every daemon of the machine, like a pip install
        staged.chmod(0o755)  # a temporary directory is created private
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    progress(f"converted in {time.perf_counter() - start:.0f}s: {out}")
    return out
