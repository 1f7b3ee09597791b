"""The closed-form solvers and the Woodbury-backed preservation matrix, on random float64 data."""

from __future__ import annotations

import pytest
import torch

from editd.editing.solvers import (
    Preservation,
    layer_share,
    solve_alphaedit,
    solve_emmet,
    solve_memit,
)

D_IN, D_OUT = 48, 24


def _c0(seed: int, tokens: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Correlated keys with a decaying spectrum, like MLP activations.
    mix = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, D_IN, dtype=torch.float64)
    x = torch.randn(tokens, D_IN, generator=g, dtype=torch.float64) @ (mix * scales)
    return x.T @ x / tokens


def _batch(seed: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(D_IN, b, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, b, generator=g, dtype=torch.float64)
    return keys, resid


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("b", [1, 4, 16])
def test_emmet_meets_its_constraints(b: int) -> None:
    pres = Preservation.from_c0(_c0(0), 1e3)
    pres.add(_batch(1, 8)[0])  # sequential: earlier keys in C too
    keys, resid = _batch(2, b)
    sol = solve_emmet(keys, resid, pres)
    delta = sol.left @ sol.right
    assert _rel(delta @ keys, resid) <= 1e-4
    assert sol.diagnostics["resid_rel_after"] <= 1e-4
    assert sol.left.shape[1] <= b and torch.linalg.matrix_rank(delta) <= b


def test_emmet_is_the_minimum_c_norm_update_meeting_the_constraints() -> None:
    # Any other Δ' with Δ'K = R has a larger tr(Δ' C Δ'ᵀ): perturb within the constraint set.
    c0 = _c0(3)
    pres = Preservation.from_c0(c0, 10.0)
    keys, resid = _batch(4, 5)
    sol = solve_emmet(keys, resid, pres)
    delta = sol.left @ sol.right
    c = 10.0 * c0
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    proj = torch.eye(D_IN, dtype=torch.float64) - keys @ torch.linalg.pinv(keys)
    other = delta + 1e-2 * noise @ proj  # still satisfies other @ keys == resid
    assert _rel(other @ keys, resid) < 1e-8
    assert torch.trace(delta @ c @ delta.T) < torch.trace(other @ c @ other.T)


def test_memit_equals_the_dense_normal_equations() -> None:
    c0 = _c0(6)
    lam = 50.0
    earlier, _ = _batch(7, 6)
    pres = Preservation.from_c0(c0, lam)
    pres.add(earlier)
    keys, resid = _batch(8, 10)
    sol = solve_memit(keys, resid, pres)
    system = lam * c0 + earlier @ earlier.T + keys @ keys.T
    dense = resid @ keys.T @ torch.linalg.inv(system)
    assert _rel(sol.left @ sol.right, dense) <= 1e-9
    assert sol.left.shape == (D_OUT, 10) and sol.right.shape == (10, D_IN)


def test_emmet_with_eps_is_memit_with_scaled_lambda() -> None:
    c0 = _c0(9)
    keys, resid = _batch(10, 7)
    eps, lam = 0.25, 40.0
    emmet = solve_emmet(keys, resid, Preservation.from_c0(c0, lam), eps=eps)
    memit = solve_memit(keys, resid, Preservation.from_c0(c0, eps * lam))
    assert _rel(emmet.left @ emmet.right, memit.left @ memit.right) <= 1e-9


def test_woodbury_solve_equals_dense_solve_across_refactors() -> None:
    c0 = _c0(11)
    pres = Preservation.from_c0(c0, 20.0, max_rank=12)
    dense_c = 20.0 * c0
    x = _batch(12, 5)[0]
    for step in range(6):
        keys = _batch(100 + step, 5)[0]
        pres.add(keys)
        dense_c = dense_c + keys @ keys.T
        assert _rel(pres.solve(x), torch.linalg.solve(dense_c, x)) <= 1e-9
        assert pres.rank <= 12
    assert pres.refactors >= 2  # 30 keys through a rank-12 low-rank part


def test_reset_rebuilds_what_sequential_adds_built() -> None:
    c0 = _c0(13)
    kept = [_batch(200 + i, 4)[0] for i in range(3)]
    undone = _batch(300, 4)[0]
    pres = Preservation.from_c0(c0, 5.0, max_rank=8)
    for k in [*kept, undone]:
        pres.add(k)
    pres.reset(kept)
    fresh = Preservation.from_c0(c0, 5.0, max_rank=8)
    for k in kept:
        fresh.add(k)
    x = _batch(301, 3)[0]
    assert _rel(pres.solve(x), fresh.solve(x)) <= 1e-9
    assert _rel(pres.dense(), 5.0 * c0 + sum(k @ k.T for k in kept)) <= 1e-9


def test_alphaedit_matches_its_original_formula_and_spares_preserved_keys() -> None:
    c0 = _c0(14)
    alpha = 1.0
    pres = Preservation.null_space(c0, alpha, rel_threshold=1e-2)
    p = pres.projector
    assert p is not None and 0 < int(torch.trace(p).round()) < D_IN
    earlier = _batch(15, 4)[0]
    pres.add(earlier)
    keys, resid = _batch(16, 6)
    sol = solve_alphaedit(keys, resid, pres)
    delta = sol.left @ sol.right
    # AlphaEdit as published: Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹.
    eye = torch.eye(D_IN, dtype=torch.float64)
    reference = (
        resid
        @ keys.T
        @ p
        @ torch.linalg.inv((keys @ keys.T + earlier @ earlier.T) @ p + alpha * eye)
    )
    assert _rel(delta, reference) <= 1e-8
    # Keys in C0's dominant directions (what the model relies on) are left untouched.
    evals, evecs = torch.linalg.eigh(c0)
    preserved = evecs[:, evals >= 1e-2 * evals.mean()]
    assert float((delta @ preserved).norm()) <= 1e-8 * float(delta.norm())


def test_the_null_space_projector_is_an_orthogonal_projector() -> None:
    pres = Preservation.null_space(_c0(14), 1.0, rel_threshold=1e-2)
    p = pres.projector
    assert p is not None
    assert _rel(p @ p, p) <= 1e-10  # idempotent
    assert _rel(p.T, p) <= 1e-12  # symmetric: orthogonal, not oblique
    keys = _batch(17, 5)[0]
    assert _rel(pres.project(pres.project(keys)), pres.project(keys)) <= 1e-10


def test_encore_norm_constraint_is_a_ridge_relative_to_c0s_scale() -> None:
    # ENCORE's λ_n‖Δ‖²: MEMIT's normal equations gain ρ·μ·I, μ = mean eigenvalue of λC0.
    c0 = _c0(18)
    lam, rho = 50.0, 0.5
    keys, resid = _batch(19, 10)
    ridged = solve_memit(keys, resid, Preservation.from_c0(c0, lam, ridge=rho))
    mu = float(torch.trace(lam * c0)) / D_IN
    eye = torch.eye(D_IN, dtype=torch.float64)
    system = lam * c0 + rho * mu * eye + keys @ keys.T
    dense = resid @ keys.T @ torch.linalg.inv(system)
    assert _rel(ridged.left @ ridged.right, dense) <= 1e-9
    plain = solve_memit(keys, resid, Preservation.from_c0(c0, lam))
    assert ridged.diagnostics["update_norm"] < plain.diagnostics["update_norm"]
    # The same ρ means the same on keys of another scale: the update scales with R / K only.
    scaled = solve_memit(keys * 10, resid, Preservation.from_c0(c0 * 100, lam, ridge=rho))
    assert _rel(scaled.left @ scaled.right * 10, dense) <= 1e-9
    # EMMET keeps its constraints under the ridge: only the metric changes.
    emmet = solve_emmet(keys, resid, Preservation.from_c0(c0, lam, ridge=rho))
    assert _rel(emmet.left @ emmet.right @ keys, resid) <= 1e-6


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_re_solving_sequential_batches_equals_one_batch_of_the_same_facts(eps: float) -> None:
    # Consolidation (Editor.consolidate): each fact's target is what the accumulated update
    # added at its key when it was edited; re-solving all of them on the fresh preservation
    # matrix is the one-batch solve of those facts, whatever the sequence did in between.
    c0 = _c0(20)
    lam = 1e4  # as on SmolLM2 (λ 15,000): beside λC0 the preserved keys weigh little
    pres = Preservation.from_c0(c0, lam)
    (k1, r1), (k2, r2) = _batch(21, 6), _batch(22, 6)
    d1 = solve_emmet(k1, r1, pres, eps=eps)
    d1 = d1.left @ d1.right
    pres.add(k1)
    d2 = solve_emmet(k2, r2 - d1 @ k2, pres, eps=eps)
    total = d1 + d2.left @ d2.right
    keys = torch.cat([k1, k2], dim=1)
    edited = torch.cat([d1 @ k1, total @ k2], dim=1)
    joint = solve_emmet(keys, edited, pres.fresh(), eps=eps)
    joint = joint.left @ joint.right
    one_batch = solve_emmet(keys, edited, Preservation.from_c0(c0, lam), eps=eps)
    assert _rel(joint, one_batch.left @ one_batch.right) <= 1e-9
    if eps == 0.0:
        # The second batch moved the first batch's facts; the joint solve puts them back.
        assert _rel(total @ k1, r1) > 1e-2
        assert _rel(joint @ keys, torch.cat([r1, r2], dim=1)) <= 1e-6
        # Restoring them costs: the joint update is larger on ordinary keys (tr Δ C0 Δᵀ).
        assert torch.trace(joint @ c0 @ joint.T) > torch.trace(total @ c0 @ total.T)
        # Re-solved for what the keys get now, nothing changes: every batch's update lies in
        # span(C⁻¹K) of the keys so far, so the sequential sum already is the least-C0-norm
        # update doing what it does at its keys. Consolidation can repair, not compact.
        now = solve_emmet(keys, total @ keys, pres.fresh())
        assert _rel(now.left @ now.right, total) <= 1e-6


def test_alphaedit_needs_a_null_space_preservation() -> None:
    keys, resid = _batch(17, 2)
    with pytest.raises(ValueError, match="null-space"):
        solve_alphaedit(keys, resid, Preservation.from_c0(_c0(18), 1.0))


def test_an_empty_null_space_is_refused_not_an_edit_that_does_nothing() -> None:
    # A well-conditioned C0 (every eigenvalue within 3× of the mean, as SmolLM2's within 7×)
    # has no direction below 0.01 × the mean: AlphaEdit would project every update to zero.
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(3)))
    c0 = q @ torch.diag(torch.linspace(0.5, 2.0, D_IN)) @ q.T
    with pytest.raises(ValueError, match=r"null space is empty.*null_threshold above 0\.4"):
        Preservation.null_space(c0, 1.0, rel_threshold=1e-2)
    pres = Preservation.null_space(c0, 1.0, rel_threshold=0.6)
    keys, resid = _batch(19, 2)
    assert solve_alphaedit(keys, resid, pres).left.abs().sum() > 0


def test_duplicate_keys_fall_back_to_least_norm() -> None:
    # Two facts about one subject share a key; exact constraints then contradict each other.
    pres = Preservation.from_c0(_c0(19), 10.0)
    k, resid = _batch(20, 2)
    keys = torch.cat([k[:, :1], k[:, :1]], dim=1)
    sol = solve_emmet(keys, resid, pres)
    delta = sol.left @ sol.right
    assert sol.diagnostics["singular"] == 1.0
    assert torch.isfinite(delta).all()
    # The best it can do is the mean of the two targets at the shared key.
    assert _rel(delta @ keys[:, :1], resid.mean(1, keepdim=True)) <= 1e-6


def test_rank_deficient_c0_still_factors() -> None:
    x = torch.randn(10, D_IN, dtype=torch.float64)  # 10 tokens: C0 has rank 10 < d_in
    pres = Preservation.from_c0(x.T @ x / 10, 1.0)
    keys, resid = _batch(21, 3)
    sol = solve_emmet(keys, resid, pres)
    assert torch.isfinite(sol.left @ sol.right).all()


def test_float32_inputs_give_float32_factors_solved_in_float64() -> None:
    pres = Preservation.from_c0(_c0(22), 100.0)
    keys, resid = _batch(23, 4)
    sol = solve_emmet(keys.float(), resid.float(), pres)
    assert sol.left.dtype == sol.right.dtype == torch.float32
    assert _rel((sol.left @ sol.right).double() @ keys, resid) <= 1e-4


def test_layer_shares_sum_to_the_residual_and_match_one_joint_emmet() -> None:
    # Three layers with different preservation: the first layer's share is what the stacked
    # (joint) EMMET update writes through that layer, and peeling layers off one at a time
    # (as the editor does) hands out exactly the whole residual.
    press = [Preservation.from_c0(_c0(10 + i), 10.0 ** (i + 1)) for i in range(3)]
    keys = [_batch(20 + i, 6)[0] for i in range(3)]
    resid = _batch(30, 6)[1]

    left, shares = resid, []
    for i in range(3):
        share = layer_share(left, keys[i:], press[i:])
        shares.append(share)
        left = left - share
    assert _rel(sum(shares), resid) <= 1e-10
    assert float(left.norm()) <= 1e-10 * float(resid.norm())

    # The joint EMMET over stacked keys: Δ = R G⁻¹ Kᵀ C⁻¹ with block-diagonal C.
    stacked_k = torch.cat(keys)
    c = torch.block_diag(*(p.dense() for p in press))
    ck = torch.linalg.solve(c, stacked_k)
    delta = resid @ torch.linalg.solve(stacked_k.T @ ck, ck.T)
    first = delta[:, :D_IN] @ keys[0]
    assert _rel(shares[0], first) <= 1e-8


def test_equal_layers_split_the_residual_evenly() -> None:
    pres = Preservation.from_c0(_c0(40), 100.0)
    keys, resid = _batch(41, 4)
    share = layer_share(resid, [keys, keys, keys], [pres, pres, pres])
    assert _rel(share, resid / 3) <= 1e-10


def test_every_configurable_algorithm_has_a_solver() -> None:
    from editd.config import ALGOS
    from editd.editing.solvers import SOLVERS

    assert tuple(SOLVERS) == ALGOS
