"""The gated form's records in a store: a version's gate tensors, its manifest `gate` record,
and the projections kept once per store (`gates/<sha256>.safetensors`).

A gated version's update file holds, beside its factors, `_gate.facts` (the batch's gate keys)
its per-fact thresholds `_gate.thresholds` where the gate has them, and, in stores written
before projections had files of their own, `_gate.projection` inline.
Its manifest's `gate` record names the module, threshold, rank and the projection's digest.
The same tensors travel on the update log (`version_factors`, `wire_gate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from editd.memory import GATE_KEYS, GATE_LIMITS, PROJECTION, Block, Gate, projection_digest
from editd.store.errors import StoreMismatch
from editd.store.layout import Layout
from editd.store.values import f32

# The parts `Layout.read_update` returns a gate's tensors under ("projection", "facts",
# "thresholds").
GATE_PARTS = tuple(n.rpartition(".")[2] for n in (PROJECTION, GATE_KEYS, GATE_LIMITS))


def check_gate(
    gate: Gate, base_meta: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A gate's tensors as a version keeps them, and its manifest record; refused
    (`StoreMismatch`, `ValueError`) unless it reads one of the store's modules, fits its
    width, is finite and has a threshold in (0, 1]."""
    if gate.module not in base_meta:
        raise StoreMismatch(f"the gate reads {gate.module}, not one of the store's modules")
    d_in = base_meta[gate.module]["shape"][1]
    proj, gkeys = f32(gate.projection), f32(gate.keys)
    if proj.dim() != 2 or proj.shape[0] != d_in or gkeys.dim() != 2:
        raise ValueError(f"gate projection {tuple(proj.shape)} does not read a {d_in}-wide input")
    if gkeys.shape[1] != proj.shape[1]:
        raise ValueError(
            f"gate keys {tuple(gkeys.shape)} do not fit projection {tuple(proj.shape)}"
        )
    if not (bool(torch.isfinite(proj).all()) and bool(torch.isfinite(gkeys).all())):
        raise ValueError("the gate holds NaN or infinite values")
    if not 0.0 < float(gate.threshold) <= 1.0:
        raise ValueError(f"gate threshold {gate.threshold} is not in (0, 1]")
    tensors = {PROJECTION: proj, GATE_KEYS: gkeys}
    if gate.thresholds is not None:
        limits = f32(gate.thresholds)
        if tuple(limits.shape) != (gkeys.shape[0],):
            raise ValueError(
                f"gate thresholds {tuple(limits.shape)} do not fit {gkeys.shape[0]} keys"
            )
        if not bool(torch.isfinite(limits).all()) or bool((limits < gate.threshold).any()):
            raise ValueError(f"gate thresholds must be finite and at least {gate.threshold}")
        tensors[GATE_LIMITS] = limits
    record = {**gate.record(), "projection": projection_digest(proj)}
    return tensors, record


def block_of(
    version: int,
    tensors: Mapping[str, torch.Tensor],
    modules: Mapping[str, Any],
    gate: Mapping[str, Any],
) -> Block:
    """The block a gated version adds to the memory, from its flat `<module>.left|right` and
    gate tensors and its manifest's `modules` and `gate` records."""
    return Block(
        version=version,
        layers={n: (tensors[f"{n}.left"], tensors[f"{n}.right"]) for n in sorted(modules)},
        gate=Gate(
            module=str(gate["module"]),
            threshold=float(gate["threshold"]),
            projection=tensors[PROJECTION],
            keys=tensors[GATE_KEYS],
            thresholds=tensors.get(GATE_LIMITS),
        ),
    )


def wire_gate(gate: Mapping[str, Any] | None, factors: Mapping[str, torch.Tensor]) -> Gate | None:
    """The gate a version record from the update log carries, or None for the weight form."""
    if gate is None:
        return None
    if PROJECTION not in factors or GATE_KEYS not in factors:
        raise ValueError("a gated version without its gate tensors")
    return Gate(
        module=str(gate["module"]),
        threshold=float(gate["threshold"]),
        projection=factors[PROJECTION],
        keys=factors[GATE_KEYS],
        thresholds=factors.get(GATE_LIMITS),
    )


class Projections:
    """The store's gate projections by digest: one file each, and one tensor each in memory,
    shared by every block that uses it (so the memory's size and fingerprint count it once)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._by_digest: dict[str, torch.Tensor] = {}

    def of(self, gate: Mapping[str, Any], inline: torch.Tensor | None) -> torch.Tensor:
        """A kept version's projection, read once from `gates/<digest>` (or `inline`, from its
        update file, for a version written before projections had files)."""
        digest = gate.get("projection")
        if digest is None:
            assert inline is not None
            return self._by_digest.setdefault(projection_digest(inline), inline)
        if digest not in self._by_digest:
            self._by_digest[digest] = self._layout.read_projection(digest)
        return self._by_digest[digest]

    def shared(self, digest: str, new: torch.Tensor) -> torch.Tensor:
        """The tensor already held under `digest`, else `new` (a version not yet kept)."""
        return self._by_digest.get(digest, new)

    def keep(self, digest: str, projection: torch.Tensor) -> None:
        """Durably keep a projection, before the version that needs it is written; a crash
        in between leaves a spare file."""
        self._layout.write_projection(digest, projection)
        self._by_digest.setdefault(digest, projection)
