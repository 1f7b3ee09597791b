"""Where the packaged built-in model lives."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets" / "builtin"


def builtin_model_dir() -> Path:
    """The shipped Hugging Face directory of the built-in model (config, safetensors, tokenizer).

    It loads through `AutoModelForCausalLM.from_pretrained` like any local Llama-3 directory.
    """
    if not (ASSETS / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from {ASSETS}; rebuild it with `editd model build`"
        )
    return ASSETS


def is_builtin(model_dir: Path | None) -> bool:
    """Whether `model_dir` is the packaged built-in model's directory."""
    return model_dir is not None and Path(model_dir).resolve() == builtin_model_dir().resolve()
