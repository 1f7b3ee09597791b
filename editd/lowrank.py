"""What an edit is and what it serves: the update type, the served-weight formula, fingerprints.

A leaf module: the editor produces `EditUpdate`s, the edit store journals them, the model handle
serves them, and none of the three imports another for it. Tensors in an update are float32 on
the CPU or the compute device; the store moves them to the CPU before writing.

The edit store computes what every version serves and records its sha256; the model handle
writes the same weights into the model. Both must produce the same bits, on any device and any
thread count, so the arithmetic lives here as pure functions that both import:

- `lowrank_product(left, right)` expands a low-rank update with a fixed summation order.
  A BLAS matmul may block the inner dimension differently with the thread count or the
  library, which would change the last bit of some elements; elementwise float64 products of
  float32 inputs are exact, and summing them in a fixed order then rounding once is
  reproducible everywhere.
- `served_weight(base, delta)` is `cast(base.float() + delta)`: one float32 add and one cast,
  both correctly rounded elementwise on the CPU and on accelerators.
- `tensor_sha256(t)` hashes a tensor's raw bytes (its dtype's memory layout, row-major), which
  is what a manifest records and what a rollback is checked against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from editd.memory import Gate

# float64 accumulator rows per block: about 1 MiB, so a block stays in cache across the r passes.
_BLOCK_BYTES = 1 << 20


def lowrank_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right as float32 on the CPU, bit-reproducible across machines and thread counts.

    left: (d_out, r), right: (r, d_in). Each product of two float32 values is exact in
    float64; the r terms are summed in index order and rounded to float32 once.
    """
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"cannot multiply {tuple(left.shape)} by {tuple(right.shape)}")
    left64 = left.detach().to("cpu", torch.float32).to(torch.float64)  # (d_out, r)
    right64 = right.detach().to("cpu", torch.float32).to(torch.float64)  # (r, d_in)
    d_out, rank = left64.shape
    d_in = right64.shape[1]
    out = torch.empty(d_out, d_in, dtype=torch.float32)
    rows = max(1, _BLOCK_BYTES // (8 * max(d_in, 1)))
    for start in range(0, d_out, rows):
        stop = min(start + rows, d_out)
        acc = torch.zeros(stop - start, d_in, dtype=torch.float64)  # (rows, d_in)
        for j in range(rank):
            # A separate multiply and add (never addr/addmm): a fused multiply-add rounds once
            # where this rounds twice, and which one a kernel uses differs across backends.
            acc += left64[start:stop, j : j + 1] * right64[j]
        out[start:stop] = acc
    return out


def accumulate(delta: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """D_v = D_{v-1} + left @ right, float32 on the CPU; `delta` None means D_{v-1} = 0.

    Returns a new tensor; `delta` is left unchanged.
    """
    step = lowrank_product(left, right)  # (d_out, d_in)
    if delta is None:
        return step
    if delta.shape != step.shape:
        raise ValueError(f"update of shape {tuple(step.shape)} for a delta of {tuple(delta.shape)}")
    return delta + step


def served_weight(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The weight served for accumulated float32 update `delta`: cast(base.float() + delta).

    Computed on `base`'s device; the result has `base`'s dtype and device. Callers with no
    update for a module serve `base` itself (adding a zero would turn -0.0 into +0.0).
    """
    return (base.float() + delta.to(device=base.device, dtype=torch.float32)).to(base.dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 hex digest of a tensor's raw bytes (contiguous, on the CPU, in its own dtype)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


@dataclass(frozen=True)
class LayerUpdate:
    """The update of one edited weight, kept low-rank: Δ = left @ right.

    left: (d_out, r), right: (r, d_in), r ≤ batch size. keys: (d_in, b), the batch's keys at
    this layer, which sequential editing adds to the preservation matrix of later batches.
    `replaces`: left @ right is the whole accumulated update from here on (D_v = left @ right,
    not D_{v-1} + left @ right). A consolidation is one: its joint solve has rank n + anchors,
    where the change from D_{v-1} to it is dense.
    """

    left: torch.Tensor
    right: torch.Tensor
    keys: torch.Tensor
    replaces: bool = False

    def dense(self) -> torch.Tensor:
        return self.left @ self.right  # (d_out, d_in)


@dataclass(frozen=True)
class EditUpdate:
    """The result of `compute_update` for one batch: one LayerUpdate per edited module name.

    `gate` (an `editd.memory.Gate`): the batch is served through a gated memory instead of
    being added to the weights.
    """

    layers: dict[str, LayerUpdate]
    diagnostics: dict[str, object] = field(default_factory=dict)
    gate: Gate | None = None
