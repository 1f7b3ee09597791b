"""Values passed between the editor, the edit store and the daemon.

Tensors here are float32 on the CPU or the compute device; the store moves them to the CPU
before writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LayerUpdate:
    """The update of one edited weight, kept low-rank: Δ = left @ right.

    left: (d_out, r), right: (r, d_in), r ≤ batch size. keys: (d_in, b), the batch's keys at
    this layer, which sequential editing adds to the preservation matrix of later batches.
    """

    left: torch.Tensor
    right: torch.Tensor
    keys: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right  # (d_out, d_in)


@dataclass(frozen=True)
class EditUpdate:
    """The result of `compute_update` for one batch: one LayerUpdate per edited module name."""

    layers: dict[str, LayerUpdate]
    diagnostics: dict[str, object] = field(default_factory=dict)
