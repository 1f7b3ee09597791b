"""`editd export VERSION --format hf|peft --out DIR`: the edited model for other serving engines.

- `hf`: a complete Hugging Face checkpoint of the model as editd serves `VERSION`: the model
  directory copied, with each safetensors file that holds an edited tensor rewritten with the
  served tensor (the store's bits, its dtype). Loadable by `AutoModelForCausalLM` and by vLLM /
  TGI / SGLang as a plain model directory. Every written tensor is read back and checked
  against the version's manifest sha256.
- `peft`: a LoRA adapter on the edited `down_proj`s whose B/A are the stored factors of every
  version in the lineage, concatenated (rank = their total rank, per module in
  `rank_pattern`, scaling 1), so `W + B A` equals the served update up to float32 rounding.
  With `--max-rank N` an adapter over N is compressed by truncated SVD and the error is
  measured and printed (relative Frobenius error of each update, and logits of the adapted
  model against the served one on the canary prompts); without it nothing is truncated.

Reads the store read-only, so it works while the daemon runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editd import durable
from editd.config import Settings
from editd.exitcodes import EXIT_FAILURE, EXIT_OK
from editd.lowrank import tensor_sha256
from editd.store.store import EditStore, StoreError

log = logging.getLogger(__name__)

# Files of an editd model directory that are editd's own, not the checkpoint's.
_EDITD_FILES = {"c0-corpus.txt"}


class ExportError(RuntimeError):
    """The export cannot be written as asked; the message says why."""


def check_base(store: EditStore, model_dir: Path) -> None:
    """Refuse a model directory whose edited tensors are not the store's base."""
    expected = store.base_sha256()
    base = store.base()
    seen = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                name = key.removesuffix(".weight")
                if name in expected:
                    seen.add(name)
                    t = f.get_tensor(key).to(base[name].dtype)
                    if tensor_sha256(t) != expected[name]:
                        raise ExportError(
                            f"{model_dir}: {key} is not the weight the store at {store.root} "
                            "was made for; pass the model the daemon serves (--model)"
                        )
    if seen != set(expected):
        raise ExportError(f"{model_dir} lacks the edited tensors {sorted(set(expected) - seen)}")


def refuse_gated(store: EditStore, version: int) -> None:
    """A gated version cannot be written as plain weights and stay what editd serves."""
    gated = [v for v in store.lineage(version)[1:] if store.version(v).gate is not None]
    if gated:
        raise ExportError(
            f"version {version} is served through a gated memory (editing.memory: gated): "
            "each batch's update acts only at tokens whose key matches one of its facts, and "
            "neither a plain checkpoint nor a LoRA adapter can gate. Merged into the weights "
            "every edit would act on every token, which is the plain-weight form that the gate "
            "exists to avoid (see the README's 'Served forms'). Serve it with editd (replicas "
            "follow the update log), or edit with editing.memory: weights to export"
        )


def export_hf(store: EditStore, model_dir: Path, version: int, out: Path) -> dict[str, Any]:
    """Write the full checkpoint of `version` to `out` (created whole, or not at all)."""
    refuse_gated(store, version)
    check_base(store, model_dir)
    served = store.served(version)
    expected = store.expected_sha256(version)
    keys = {f"{name}.weight": name for name in served}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} holds no safetensors files to rewrite")
    _refuse_existing(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns(*_EDITD_FILES))
        found: set[str] = set()
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                if not keys.keys() & set(names):
                    continue
                meta = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in names}
            for key in keys.keys() & set(names):
                tensors[key] = served[keys[key]].contiguous()
                found.add(key)
            save_file(tensors, staged / path.name, metadata=meta)
        missing = sorted(set(keys) - found)
        if missing:
            raise ExportError(f"the checkpoint in {model_dir} has no tensors {missing}")
        bad = _check_hf(staged, keys, expected)
        if bad:
            raise ExportError(f"exported tensors differ from version {version}'s sha256: {bad}")
        (staged / "editd-export.json").write_text(
            json.dumps({"version": version, "source": str(model_dir), "sha256": expected}, indent=1)
        )
        staged.rename(out)
    durable.fsync_dir(out.parent)
    return {"format": "hf", "version": version, "out": str(out), "tensors": len(keys)}


def _check_hf(directory: Path, keys: dict[str, str], expected: dict[str, str]) -> list[str]:
    bad = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in set(f.keys()) & keys.keys():
                if tensor_sha256(f.get_tensor(key)) != expected[keys[key]]:
                    bad.append(key)
    return sorted(bad)


def lora_factors(
    store: EditStore, version: int, max_rank: int | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Per module (B, A) with B A = D_version; and the relative error where truncated.

    B (d_out, r) stacks the versions' left factors, A (r, d_in) their right factors. Over
    `max_rank`, the product is cut to its leading `max_rank` singular directions.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for name, pairs in store.factors(version).items():
        b = torch.cat([left for left, _ in pairs], dim=1)  # (d_out, R)
        a = torch.cat([right for _, right in pairs], dim=0)  # (R, d_in)
        if max_rank is not None and b.shape[1] > max_rank:
            b, a, errors[name] = _truncate(b, a, max_rank)
        out[name] = (b.contiguous(), a.contiguous())
    return out, errors


def _truncate(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    # SVD of B A through the QR factors of B and Aᵀ: O((d_out + d_in) R²), never d_out × d_in.
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    kept = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300))
    new_b = (qb @ (u[:, :rank] * s[:rank])).float()
    new_a = (vh[:rank] @ qa.T).float()
    return new_b, new_a, kept


def export_peft(
    store: EditStore,
    model_dir: Path,
    version: int,
    out: Path,
    *,
    max_rank: int | None = None,
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter whose update is `version`'s; see the module docstring."""
    refuse_gated(store, version)
    check_base(store, model_dir)
    factors, errors = lora_factors(store, version, max_rank)
    if not factors:
        raise ExportError(f"version {version} changes nothing: there is no adapter to write")
    ranks = {name: b.shape[1] for name, (b, _) in factors.items()}
    top = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": top,
        "lora_alpha": top,
        # Scaling is alpha / r per module; alpha = r makes it 1, so B A is the update itself.
        "rank_pattern": {name: r for name, r in ranks.items()},
        "alpha_pattern": {name: r for name, r in ranks.items()},
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    _refuse_existing(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        staged.mkdir()
        save_file(tensors, staged / "adapter_model.safetensors", metadata={"format": "pt"})
        (staged / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
        staged.rename(out)
    durable.fsync_dir(out.parent)
    return {
        "format": "peft",
        "version": version,
        "out": str(out),
        "rank": ranks,
        "truncated_relative_error": errors,
    }


def adapter_logit_error(
    model_dir: Path, store: EditStore, version: int, adapter: Path, prompts: list[str]
) -> dict[str, float]:
    """Logits of base + adapter against the served model of `version` on `prompts`."""
    from safetensors.torch import load_file

    from editd.editing.model import ModelHandle

    handle = ModelHandle.load(model_dir, device="cpu", dtype="float32")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    served = store.served(version)
    tok = handle.tokenizer
    diffs, agree = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            outputs = {}
            for kind in ("served", "adapter"):
                for name in served:
                    w = handle.weight(name)
                    if kind == "served":
                        w.copy_(served[name].float())
                    else:
                        prefix = f"base_model.model.{name}"
                        b, a = (
                            weights[f"{prefix}.lora_B.weight"],
                            weights[f"{prefix}.lora_A.weight"],
                        )
                        w.copy_(store.base()[name].float() + b @ a)
                outputs[kind] = handle.model(input_ids=ids).logits[0, -1]
            diffs.append(float((outputs["served"] - outputs["adapter"]).abs().max()))
            agree.append(float(outputs["served"].argmax() == outputs["adapter"].argmax()))
    return {"max_abs_logit_diff": max(diffs), "top1_agreement": sum(agree) / len(agree)}


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise ExportError(f"{out} exists; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)


def main(args: argparse.Namespace, settings: Settings) -> int:
    from editd.models.registry import resolve_model

    store = EditStore(settings.store.data_dir, readonly=True)
    try:
        store.open()
        version = store.current if args.version is None else args.version
        store.version(version)  # a clear error for a version that does not exist
        model_dir = resolve_model(settings.model.path, cache=settings.model.cache_dir)
        if args.format == "hf":
            result = export_hf(store, Path(model_dir), version, args.out)
        else:
            result = export_peft(store, Path(model_dir), version, args.out, max_rank=args.max_rank)
            if result["truncated_relative_error"]:
                from editd.monitoring.canary import canary_prompts

                result["logits"] = adapter_logit_error(
                    Path(model_dir), store, version, args.out, canary_prompts()[:32]
                )
    except (StoreError, ExportError, OSError) as exc:
        print(f"editd export: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    print(json.dumps(result, indent=1))
    return EXIT_OK
