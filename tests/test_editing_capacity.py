"""The capacity monitor's figures, on random tensors."""

from __future__ import annotations

import torch

from editd.editing.capacity import layer_capacity, norm_ratio, output_drift


def test_output_drift_is_the_rms_output_change_on_keys_with_second_moment_c0() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5000, 32, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 32)
    c0 = keys.T @ keys / len(keys)
    weight = torch.randn(16, 32, generator=g, dtype=torch.float64)
    delta = 0.1 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    direct = ((keys @ delta.T).norm() / (keys @ weight.T).norm()).item()
    assert abs(output_drift(delta, weight, c0) - direct) <= 1e-9
    assert abs(norm_ratio(delta, weight) - (delta.norm() / weight.norm()).item()) <= 1e-12


def test_an_update_along_keys_the_model_never_sees_costs_no_drift_but_counts_in_norm() -> None:
    # C0 lives in the first half of the key space; an update in the other half moves ‖Δ‖
    # (ENCORE's norm growth) but not the output on ordinary text.
    c0 = torch.zeros(8, 8, dtype=torch.float64)
    c0[:4, :4] = torch.eye(4, dtype=torch.float64)
    weight = torch.ones(3, 8, dtype=torch.float64)
    delta = torch.zeros(3, 8, dtype=torch.float64)
    delta[:, 4:] = 1.0
    row = layer_capacity({"m": delta}, {"m": weight}, {"m": c0})["m"]
    assert row["output_drift"] == 0.0
    assert abs(row["norm_ratio"] - 2**-0.5) <= 1e-12
    assert layer_capacity({"m": delta}, {"m": weight}) == {"m": {"norm_ratio": row["norm_ratio"]}}
