"""What a version serves, computed from its parts, and its fingerprint. No I/O.

D_v = D_{v−1} + left_v @ right_v, each product expanded by `lowrank.lowrank_product` from the
stored float32 factors in a fixed order, so D_v has the same bits whether it is rebuilt from
the base or from a snapshot, on any machine. A module whose manifest entry says
`"replaces": true` (a consolidation) starts over: D_v = left_v @ right_v. The served weight is
`lowrank.served_weight(base, D_v)`, the formula the model handle uses too.

A version's fingerprint (its manifest's `sha256`) is the sha256 of every edited tensor as
served, plus, for the gated form, the memory's chain under `MEMORY_SHA256`. The editor's commit
records it, a replica's ingest checks a record against it, and a restore, rollback or follow
compares what is served with it (`mismatched`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from editd.lowrank import EditUpdate, accumulate, served_weight, tensor_sha256
from editd.memory import MEMORY_SHA256, GatedMemory
from editd.store.errors import StoreMismatch
from editd.store.values import f32


def replaces(modules: Mapping[str, Mapping[str, Any]], name: str) -> bool:
    """Whether a version's update of `name` is the whole accumulated update (a consolidation)."""
    return bool(modules.get(name, {}).get("replaces", False))


def advance(
    previous: Mapping[str, torch.Tensor],
    lefts: Mapping[str, torch.Tensor],
    rights: Mapping[str, torch.Tensor],
    modules: Mapping[str, Mapping[str, Any]],
) -> dict[str, torch.Tensor]:
    """D_v from D_{v−1} and one version's factors: D_{v−1} + left @ right per module it
    updates (left @ right where it replaces), module by module in name order. `previous` is
    left unchanged."""
    out = dict(previous)
    for name in sorted(lefts):
        before = None if replaces(modules, name) else previous.get(name)
        out[name] = accumulate(before, lefts[name], rights[name])
    return out


def check_layers(
    update: EditUpdate, base_meta: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """An update's weight factors as a version keeps them (`<module>.left|right|keys`, float32)
    and its manifest's `modules` record; refused unless every module is the store's, every
    shape fits its weight and every value is finite."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, layer in sorted(update.layers.items()):
        if name not in base_meta:
            raise StoreMismatch(
                f"the update edits {name}, which is not among the store's modules "
                f"{sorted(base_meta)}"
            )
        d_out, d_in = base_meta[name]["shape"]
        left, right, keys = (f32(x) for x in (layer.left, layer.right, layer.keys))
        if (
            left.dim() != 2
            or right.dim() != 2
            or keys.dim() != 2
            or left.shape[0] != d_out
            or right.shape[1] != d_in
            or left.shape[1] != right.shape[0]
            or keys.shape[0] != d_in
        ):
            raise ValueError(
                f"{name}: left {tuple(left.shape)}, right {tuple(right.shape)}, keys "
                f"{tuple(keys.shape)} do not fit a ({d_out}, {d_in}) weight"
            )
        for part, t in (("left", left), ("right", right), ("keys", keys)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}.{part} holds NaN or infinite values")
            tensors[f"{name}.{part}"] = t
        modules[name] = {"rank": left.shape[1], "keys": keys.shape[1]}
        if layer.replaces:
            modules[name]["replaces"] = True
    return tensors, modules


def fingerprint(weights: Mapping[str, str], memory: str | None) -> dict[str, str]:
    """A fingerprint record: the served tensors' sha256 and, where a gated memory is served,
    its chain under `MEMORY_SHA256`."""
    out = dict(weights)
    if memory is not None:
        out[MEMORY_SHA256] = memory
    return out


def served_sha256(
    base: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    memory: GatedMemory | None = None,
) -> dict[str, str]:
    """The fingerprint of base + `deltas` served with `memory` (what a manifest records)."""
    weights = {
        name: tensor_sha256(served_weight(t, deltas[name]) if name in deltas else t)
        for name, t in sorted(base.items())
    }
    gated = memory is not None and bool(memory.blocks)
    return fingerprint(weights, memory.fingerprint() if gated else None)


def mismatched(expected: Mapping[str, str], served: Mapping[str, str]) -> list[str]:
    """The names whose served sha256 is not the one `expected` records."""
    return sorted(n for n in expected if served.get(n) != expected[n])
