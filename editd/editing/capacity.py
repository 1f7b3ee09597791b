"""How far the accumulated update has moved each edited layer: the capacity monitor's input.

Sequential editing spends a layer's capacity: every batch adds directions to Δ = W − W0, and
the general-ability canary falls as Δ starts to answer keys it was never asked about. Two
figures per layer, both ratios so one threshold reads the same on any model:

- `norm_ratio` = ‖Δ‖_F / ‖W0‖_F, the norm growth ENCORE blames for degradation; it needs no
  statistics, so the daemon can export it after every version.
- `output_drift` = √(tr(Δ C0 Δᵀ) / tr(W0 C0 W0ᵀ)): the RMS change of the layer's output on
  the keys the model sees in ordinary text (C0), relative to the output itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def norm_ratio(delta: torch.Tensor, weight: torch.Tensor) -> float:
    """‖Δ‖_F / ‖W0‖_F."""
    return float(delta.double().norm() / weight.double().norm().clamp(min=1e-30))


def output_drift(delta: torch.Tensor, weight: torch.Tensor, c0: torch.Tensor) -> float:
    """√(tr(Δ C0 Δᵀ) / tr(W0 C0 W0ᵀ)) for Δ, W0 (d_out, d_in) and C0 (d_in, d_in)."""
    c0 = c0.to(torch.float64)
    d, w = delta.to(c0), weight.to(c0)
    num = ((d @ c0) * d).sum().clamp(min=0)
    den = ((w @ c0) * w).sum().clamp(min=1e-30)
    return float((num / den).sqrt())


def layer_capacity(
    deltas: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    c0: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Per edited module, `norm_ratio` and (given its C0) `output_drift`."""
    out: dict[str, dict[str, float]] = {}
    for name, delta in deltas.items():
        row = {"norm_ratio": norm_ratio(delta, base[name])}
        if c0 is not None and name in c0:
            row["output_drift"] = output_drift(delta, base[name], c0[name])
        out[name] = row
    return out
