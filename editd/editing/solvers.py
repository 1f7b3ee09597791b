"""Closed-form weight updates for one layer: MEMIT, EMMET (ROME = EMMET with b = 1), AlphaEdit.

Notation (docs/design.md, "The math of an update"): W (d_out, d_in) the edited weight,
K (d_in, b) the batch's keys, R (d_out, b) the residual the update must add at those keys, C the
preservation matrix.

- MEMIT:     Δ = R Kᵀ (C + K Kᵀ)⁻¹              least squares: keys matched softly
- EMMET:     Δ = R (Kᵀ C⁻¹ K + εI)⁻¹ Kᵀ C⁻¹    Δ K = R exactly when ε = 0 (ROME for b = 1).
             With ε > 0 this is exactly MEMIT with C replaced by εC (λ' = ελ): by Woodbury
             R Kᵀ(εC + KKᵀ)⁻¹ = R (εI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹. Only ε → 0 enforces the
             constraints, so ε is 0 by default; a singular Kᵀ C⁻¹ K (duplicate keys with
             different targets: no exact solution) falls back to a least-norm solve.
- AlphaEdit: Δ = R (PK)ᵀ (αI + PV (PV)ᵀ + PK (PK)ᵀ)⁻¹ with P the projector onto C0's
             (near-)null space and V the earlier batches' keys: the update leaves preserved
             keys (C0's range) untouched. This equals AlphaEdit's R Kᵀ P ((KKᵀ + VVᵀ)P + αI)⁻¹,
             rewritten so the matrix is symmetric and its low-rank part goes through Woodbury.

C = A + U Uᵀ is owned by a `Preservation`: A (λC0 for MEMIT/EMMET, plus ENCORE's norm
constraint as a ridge when asked; αI for AlphaEdit) is
Cholesky-factored once; earlier batches' keys U are a low-rank term applied through the
Woodbury identity, C⁻¹X = A⁻¹X − Z S⁻¹ Zᵀ X with Z = A⁻¹U and S = I + UᵀZ, so a batch costs
O(d_in² b + d_in m b + m³), never a d_in × d_in solve. When m grows past `max_rank` the low-rank
part is folded into A and refactored (O(d_in³), amortised over many batches).

Updates come back as factors Δ = left @ right with rank ≤ b.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

SOLVE_DTYPE = torch.float64


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor; a rank-deficient matrix (e.g. dead MLP units in C0) gets a tiny ridge."""
    chol, info = torch.linalg.cholesky_ex(a)
    if not int(info):
        return chol
    scale = a.diagonal().abs().mean().clamp(min=torch.finfo(a.dtype).tiny)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for jitter in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if not int(info):
            return chol
    raise torch.linalg.LinAlgError("preservation matrix is not positive definite")


@dataclass
class Preservation:
    """The preservation matrix C = A + U Uᵀ of one layer, factored for repeated solves.

    `base` (A before any batch) is kept on the CPU so `reset` can rebuild after a rollback.
    Keys passed to `add` are raw; with a `projector` they are projected before use.
    """

    base: torch.Tensor  # (d_in, d_in)
    projector: torch.Tensor | None = None  # (d_in, d_in)
    max_rank: int | None = None
    device: torch.device | None = None
    _chol: torch.Tensor = field(init=False, repr=False)
    _u: torch.Tensor = field(init=False, repr=False)  # (d_in, m)
    _z: torch.Tensor = field(init=False, repr=False)  # (d_in, m) = A⁻¹ U
    _s_chol: torch.Tensor = field(init=False, repr=False)  # (m, m)
    refactors: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device) if self.device is not None else self.base.device
        self.base = self.base.to("cpu", SOLVE_DTYPE)
        if self.projector is not None:
            self.projector = self.projector.to(self.device, SOLVE_DTYPE)
        d = self.base.shape[0]
        # Refactoring costs ~d³/3, the low-rank path ~d·m per key: refolding near m ≈ d/4
        # keeps both terms in the same range.
        self.max_rank = self.max_rank or max(64, d // 4)
        self._refactor(self.base.to(self.device))

    @classmethod
    def from_c0(
        cls, c0: torch.Tensor, weight: float, *, ridge: float = 0.0, **kwargs
    ) -> Preservation:
        """MEMIT/EMMET: A = λ C0 + ρ·μ·I, μ the mean eigenvalue of λ C0.

        The ridge is ENCORE's Frobenius-norm constraint (its λ_n‖Δ‖²) expressed relative to
        C0's scale, so one ρ means the same on models whose keys differ in size. It weighs
        most where C0 is small: the key directions through which C⁻¹ lets an update's norm
        grow without bound in sequential editing.
        """
        a = weight * c0.to(SOLVE_DTYPE)
        if ridge > 0:
            mean_eig = a.diagonal().mean()
            a = a + ridge * mean_eig * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return cls(a, **kwargs)

    @classmethod
    def null_space(
        cls, c0: torch.Tensor, alpha: float, *, rel_threshold: float = 1e-2, **kwargs
    ) -> Preservation:
        """AlphaEdit: A = αI, projector onto eigenvectors of C0 below rel_threshold · mean eig.

        An empty null space is refused: every update would be projected to zero and the edit
        would silently do nothing (SmolLM2-135M's C0 has no eigenvalue below 0.1 × the mean,
        so the default 0.01 found none there).
        """
        c0 = c0.to(SOLVE_DTYPE)
        evals, evecs = torch.linalg.eigh(c0)
        null = evecs[:, evals < rel_threshold * evals.mean()]  # (d_in, r_null)
        if null.shape[1] == 0:
            smallest = float(evals.min() / evals.mean())
            raise ValueError(
                f"AlphaEdit: C0 has no eigenvalue below {rel_threshold:g} × its mean (the "
                f"smallest is {smallest:.3f} × the mean), so the null space is empty and every "
                f"update would be projected away; set editing.null_threshold above "
                f"{smallest:.3f}, or edit with emmet or memit"
            )
        eye = torch.eye(c0.shape[0], dtype=SOLVE_DTYPE, device=c0.device)
        return cls(alpha * eye, projector=null @ null.T, **kwargs)

    def fresh(self) -> Preservation:
        """The same A (and projector) with no earlier keys: what a one-batch solve sees."""
        return Preservation(
            self.base, projector=self.projector, max_rank=self.max_rank, device=self.device
        )

    @property
    def dim(self) -> int:
        return self.base.shape[0]

    @property
    def rank(self) -> int:
        """Columns in the low-rank (Woodbury) part."""
        return self._u.shape[1]

    def project(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.to(self.device, SOLVE_DTYPE)
        return keys if self.projector is None else self.projector @ keys

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C⁻¹ X for X (d_in, k), float64."""
        x = x.to(self.device, SOLVE_DTYPE)
        y = torch.cholesky_solve(x, self._chol)
        if self.rank:
            y = y - self._z @ torch.cholesky_solve(self._z.T @ x, self._s_chol)
        return y

    def add(self, keys: torch.Tensor, weight: float = 1.0) -> None:
        """Preserve these (raw) keys from now on: C += w · PK (PK)ᵀ."""
        pk = self.project(keys) * weight**0.5  # (d_in, b)
        self._u = torch.cat([self._u, pk], dim=1)
        if self.rank > self.max_rank:
            a = self._chol @ self._chol.T + self._u @ self._u.T
            self._refactor(a)
            self.refactors += 1
            return
        self._z = torch.cat([self._z, torch.cholesky_solve(pk, self._chol)], dim=1)
        self._refresh_capacitance()

    def reset(self, keys: Sequence[torch.Tensor] = (), weight: float = 1.0) -> None:
        """Back to A = base, then preserve `keys` (e.g. of the versions left after a rollback)."""
        self._refactor(self.base.to(self.device))
        if not keys:
            return
        pk = torch.cat([self.project(k) for k in keys], dim=1) * weight**0.5
        if pk.shape[1] > self.max_rank:
            self._refactor(self.base.to(self.device) + pk @ pk.T)
            return
        self._u = pk
        self._z = torch.cholesky_solve(pk, self._chol)
        self._refresh_capacitance()

    def dense(self) -> torch.Tensor:
        """C itself (tests and diagnostics only: O(d_in²) memory)."""
        return self._chol @ self._chol.T + self._u @ self._u.T

    def _refactor(self, a: torch.Tensor) -> None:
        self._chol = _cholesky(a)
        d = a.shape[0]
        self._u = a.new_zeros(d, 0)
        self._z = a.new_zeros(d, 0)
        self._s_chol = a.new_zeros(0, 0)

    def _refresh_capacitance(self) -> None:
        m = self.rank
        s = torch.eye(m, dtype=SOLVE_DTYPE, device=self.device) + self._u.T @ self._z
        self._s_chol = _cholesky((s + s.T) / 2)


@dataclass(frozen=True)
class Solution:
    """Δ = left @ right, and how well it meets the batch: norms are Frobenius."""

    left: torch.Tensor  # (d_out, r)
    right: torch.Tensor  # (r, d_in)
    diagnostics: dict[str, float]


RCOND = 1e-12  # relative eigenvalue below which M counts as singular


def _sym_solve(m: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """M⁻¹ rhs for symmetric PSD M; least-norm (pseudo-inverse) if M is singular."""
    m = (m + m.T) / 2
    chol, info = torch.linalg.cholesky_ex(m)
    if not int(info):
        # A singular M (two facts sharing one key) can still factor when rounding leaves a
        # tiny positive pivot, and the solve then blows up along the null direction: whether
        # it factors depends on the BLAS build. A pivot ratio² below 1e-12 is singular in
        # float64 whichever way it rounded.
        d = chol.diagonal().abs()
        if float(d.min()) ** 2 > RCOND * float(d.max()) ** 2:
            return torch.cholesky_solve(rhs, chol), False
    return torch.linalg.pinv(m, hermitian=True, rtol=RCOND) @ rhs, True


def _solve(
    keys: torch.Tensor,
    resid: torch.Tensor,
    pres: Preservation,
    *,
    equality: bool,
    eps: float = 0.0,
) -> Solution:
    out_dtype = resid.dtype
    k = pres.project(keys)  # (d_in, b)
    r = resid.to(pres.device, SOLVE_DTYPE)  # (d_out, b)
    b = k.shape[1]
    y = pres.solve(k)  # (d_in, b) = C⁻¹ K
    g = k.T @ y  # (b, b) = Kᵀ C⁻¹ K
    eye = torch.eye(b, dtype=SOLVE_DTYPE, device=pres.device)
    # MEMIT: Kᵀ(C + KKᵀ)⁻¹ = (I + G)⁻¹ Yᵀ (Woodbury); EMMET: (G + εI)⁻¹ Yᵀ.
    m = g + eps * eye if equality else eye + g
    left_t, singular = _sym_solve(m, r.T)  # (b, d_out)
    left = left_t.T  # (d_out, b)
    right = y.T  # (b, d_in)

    raw = keys.to(pres.device, SOLVE_DTYPE)
    achieved = left @ (right @ raw)  # (d_out, b) = Δ K
    before = float(r.norm())
    after = float((r - achieved).norm())
    update_norm = float(torch.sqrt(((left.T @ left) * (right @ right.T)).sum().clamp(min=0)))
    diagnostics = {
        "resid_norm_before": before,
        "resid_norm_after": after,
        "resid_rel_after": after / before if before > 0 else 0.0,
        "update_norm": update_norm,
        "keys": float(b),
        "singular": float(singular),
    }
    return Solution(left.to(out_dtype), right.to(out_dtype), diagnostics)


def solve_memit(keys: torch.Tensor, resid: torch.Tensor, pres: Preservation) -> Solution:
    """Δ = R Kᵀ (C + K Kᵀ)⁻¹."""
    return _solve(keys, resid, pres, equality=False)


def solve_emmet(
    keys: torch.Tensor, resid: torch.Tensor, pres: Preservation, *, eps: float = 0.0
) -> Solution:
    """Δ = R (Kᵀ C⁻¹ K + εI)⁻¹ Kᵀ C⁻¹: Δ K = R when ε = 0. ROME is the case b = 1."""
    return _solve(keys, resid, pres, equality=True, eps=eps)


def solve_alphaedit(keys: torch.Tensor, resid: torch.Tensor, pres: Preservation) -> Solution:
    """Δ = R (PK)ᵀ (C + PK (PK)ᵀ)⁻¹ with C = αI + earlier projected keys: Δ (I − P) = 0."""
    if pres.projector is None:
        raise ValueError("AlphaEdit needs a null-space Preservation (Preservation.null_space)")
    return _solve(keys, resid, pres, equality=False)


def layer_share(
    resid: torch.Tensor, keys: Sequence[torch.Tensor], preservations: Sequence[Preservation]
) -> torch.Tensor:
    """The part of `resid` (d_out, b) the first of the remaining layers should write.

    `keys[l]` (d_in_l, b) and `preservations[l]` belong to the layers still to edit, this one
    first. The update of least total cost Σ tr(Δ_l C_l Δ_lᵀ) with Σ_l Δ_l K_l = R (one
    EMMET over the layers' stacked keys, treating each layer's write as reaching the output
    unchanged) has Δ_l K_l = R G⁻¹ G_l, with G_l = K_lᵀ C_l⁻¹ K_l and G = Σ G_l. A layer whose
    keys are specific (large G_l) takes more; MEMIT's R / (layers left) is the case of equal
    G_l. The shares of all layers sum to R.
    """
    if not keys or len(keys) != len(preservations):
        raise ValueError("need one Preservation per layer's keys")
    grams = []
    for k, pres in zip(keys, preservations, strict=True):
        pk = pres.project(k)
        grams.append(pk.T @ pres.solve(pk))
    total = sum(grams[1:], grams[0])
    frac, _ = _sym_solve(total, grams[0])  # (b, b) = G⁻¹ G_first
    return (resid.to(frac.device, SOLVE_DTYPE) @ frac).to(resid.device, resid.dtype)


Solver = Callable[[torch.Tensor, torch.Tensor, Preservation], Solution]

SOLVERS: dict[str, Solver] = {
    "memit": solve_memit,
    "emmet": solve_emmet,
    "alphaedit": solve_alphaedit,
}
