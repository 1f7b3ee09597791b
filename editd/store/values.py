"""Plain values for manifests: facts, offsets and diagnostics made strict JSON, tensors made
float32 on the CPU. No I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def dump(obj: Any) -> bytes:
    """A manifest's bytes: indented, UTF-8, no NaN."""
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def fact_dict(fact: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A fact (dict or pydantic model) as the JSON a manifest keeps; it must have an id."""
    if hasattr(fact, "model_dump"):
        fact = fact.model_dump(mode="json")
    if not isinstance(fact, Mapping) or not fact.get("id"):
        raise ValueError(f"a fact must be a mapping with an id, got {fact!r:.200}")
    return jsonable(dict(fact))


def offset_dict(offsets: Mapping[Any, int]) -> dict[str, int]:
    """Next offsets keyed "topic/partition", from strings, pairs or TopicPartitions."""
    out: dict[str, int] = {}
    for key, offset in offsets.items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, tuple) and len(key) == 2:
            name = f"{key[0]}/{key[1]}"
        elif hasattr(key, "topic") and hasattr(key, "partition"):
            name = f"{key.topic}/{key.partition}"
        else:
            raise ValueError(f"cannot name the partition {key!r}")
        out[name] = int(offset)
    return out


def jsonable(value: Any) -> Any:
    """Diagnostics come from the math: tensors, numpy scalars, NaN. Make them strict JSON."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a manifest")
