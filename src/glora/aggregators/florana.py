"""FLoRA-NA: mixing vectors fitted by alternating least squares (methods.md §5).

Per module, ``U`` clients of one rank ``r`` with folded factors ``B̃_u`` (d×r), ``A_u`` (r×k):
the server looks for mixing vectors ``p, q ∈ R^U`` with ``Â = Σ_u p_u A_u`` (r×k),
``B̂ = Σ_u q_u B̃_u`` (d×r) minimising

    f(p, q) = ‖B̂ Â − W̄‖_F²,    W̄ = Σ_u w_u B̃_u A_u,

with ``w_u = p_u`` (FedAvg weights, ``target="mean"``), ``1/U`` (``"uniform"``) or ``1``
(``"sum"``). ALS on the ``r×r`` Gram blocks ``G^B_ab = B̃_aᵀ B̃_b`` and ``G^A_ce = A_c A_eᵀ``
(computed once, float64, ``O(U² r² (d + k))``), starting at ``p = q = w``:

* p-step: ``X = Σ_ab q_a q_b G^B_ab``, ``H_ce = tr(X G^A_ec)``,
  ``g_c = Σ_u w_u tr((Σ_a q_a G^B_au) G^A_uc)``, ``p = (H + ε I)⁻¹ g``;
* q-step: ``Y = Σ_ce p_c p_e G^A_ce``, ``H_ab = tr(G^B_ab Y)``,
  ``g_a = Σ_u w_u tr(G^B_au (Σ_c p_c G^A_uc))``, ``q = (H + ε I)⁻¹ g``;
* after each sweep the scale gauge is fixed: ``q ← c q``, ``p ← p / c`` with ``Σ q = Σ w``.

``ε = ridge · max_c H_cc`` (relative to the scale of the Gram matrix ``H``). A half-step that
would raise ``f`` (possible only through the ridge) is rejected, so ``f`` never increases.
Stops after ``sweeps`` sweeps or when the relative decrease of a sweep is below ``tol``.
No ``d×k`` matrix is formed. Defined for one rank (``pad=True`` zero-pads, our extension).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator, weighted_sum
from glora.types import ServerState
from glora.validation import RoundInput

__all__ = ["FLoRANA", "florana_mixing"]

_F64 = torch.float64


def _objective(GB: Tensor, GA: Tensor, T: Tensor, w2: float, p: Tensor, q: Tensor) -> float:
    """``f(p, q) = tr(X Y) − 2 qᵀ T p + ‖W̄‖²`` from the Gram blocks (clamped at 0)."""
    X = torch.einsum("a,b,abij->ij", q, q, GB)
    Y = torch.einsum("c,e,ceij->ij", p, p, GA)
    return max(float((X * Y.mT).sum() - 2 * (q @ T @ p) + w2), 0.0)


def _ridge_solve(H: Tensor, g: Tensor, ridge: float) -> Tensor | None:
    """``(H + ε I)⁻¹ g`` with ``ε = ridge · max diag(H)``; None when ``H`` is zero or singular."""
    scale = float(H.diagonal().max())
    if not math.isfinite(scale) or scale <= 0:
        return None
    Hr = H + ridge * scale * torch.eye(H.shape[0], dtype=H.dtype)
    x, info = torch.linalg.solve_ex(Hr, g)
    if int(info) != 0:
        x = torch.linalg.lstsq(Hr, g.unsqueeze(-1)).solution.squeeze(-1)
    return x if bool(torch.isfinite(x).all()) else None


def florana_mixing(
    Bs: list[Tensor],
    As: list[Tensor],
    w: Tensor,
    *,
    sweeps: int = 30,
    ridge: float = 1e-8,
    tol: float = 1e-10,
) -> tuple[Tensor, Tensor, list[float]]:
    """ALS for the mixing vectors of one module.

    Args:
        Bs: ``U`` folded ``B̃_u`` (d×r).
        As: ``U`` factors ``A_u`` (r×k).
        w: ``(U,)`` target weights ``w_u``.

    Returns:
        ``(p, q, history)``: float64 ``(U,)`` mixing vectors of ``A`` and ``B`` and the objective
        ``f`` at the start (``p = q = w``) and after each sweep (non-increasing).
    """
    Bst = torch.stack([b.to(_F64) for b in Bs])  # (U, d, r)
    Ast = torch.stack([a.to(_F64) for a in As])  # (U, r, k)
    w = w.to(_F64)
    GB = torch.einsum("adi,bdj->abij", Bst, Bst)  # G^B_ab = B̃_aᵀ B̃_b
    GA = torch.einsum("cik,ejk->ceij", Ast, Ast)  # G^A_ce = A_c A_eᵀ
    # T_ac = Σ_u w_u tr(G^B_au G^A_uc) = ⟨B̃_a A_c, W̄⟩
    T = torch.einsum("u,auij,ucji->ac", w, GB, GA)
    w2 = float(torch.einsum("u,v,uvij,vuji->", w, w, GB, GA))  # ‖W̄‖² = Σ w_u w_v tr(G^B_uv G^A_vu)
    p = w.clone()
    q = w.clone()
    f = _objective(GB, GA, T, w2, p, q)
    history = [f]
    w_sum = float(w.sum())
    for _ in range(sweeps):
        f_start = f
        # p-step (q fixed)
        X = torch.einsum("a,b,abij->ij", q, q, GB)
        H = torch.einsum("ij,ceji->ce", X, GA)  # H_ce = tr(X G^A_ec)
        p_new = _ridge_solve(H, q @ T, ridge)
        if p_new is not None:
            f_new = _objective(GB, GA, T, w2, p_new, q)
            if f_new <= f:
                p, f = p_new, f_new
        # q-step (p fixed)
        Y = torch.einsum("c,e,ceij->ij", p, p, GA)
        H = torch.einsum("abij,ji->ab", GB, Y)  # H_ab = tr(G^B_ab Y)
        q_new = _ridge_solve(H, T @ p, ridge)
        if q_new is not None:
            f_new = _objective(GB, GA, T, w2, p, q_new)
            if f_new <= f:
                q, f = q_new, f_new
        # scale gauge: Σ q = Σ w (does not change f)
        q_sum = float(q.sum())
        if abs(q_sum) > 1e-12 * float(q.abs().sum()) and q_sum != 0:
            c = w_sum / q_sum
            q, p = q * c, p / c
        history.append(f)
        if f_start - f <= tol * max(f_start, 1e-300):
            break
    return p, q, history


class FLoRANA(Aggregator):
    """FLoRA-NA (Nguyen et al., 2025): FedIT-like aggregation with fitted mixing vectors.

    Args:
        sweeps: maximum ALS sweeps (each a p-step and a q-step); 0 = FedIT-like ``p = q = w``.
        ridge: Tikhonov term ``ε`` of each solve, relative to the largest diagonal entry of the
            ``U×U`` Gram matrix ``H`` (so it does not depend on the scale of the factors).
        tol: stop when a sweep lowers ``f`` by less than ``tol · f``.
        target: ``"mean"`` (``w_u = p_u``), ``"uniform"`` (``w_u = 1/U``) or ``"sum"``
            (``w_u = 1``).
        **base: options of :class:`~glora.aggregators.base.Aggregator`.
    """

    name = "florana"

    def __init__(
        self,
        *,
        sweeps: int = 30,
        ridge: float = 1e-8,
        tol: float = 1e-10,
        target: Literal["mean", "uniform", "sum"] = "mean",
        **base: object,
    ) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ValueError(f"sweeps must be a non-negative integer, got {sweeps!r}")
        for opt, value in (("ridge", ridge), ("tol", tol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{opt} must be a finite number >= 0, got {value!r}")
            if not (0 <= value < math.inf):
                raise ValueError(f"{opt} must be a finite number >= 0, got {value!r}")
        if target not in ("mean", "uniform", "sum"):
            raise ValueError(f"target must be 'mean', 'uniform' or 'sum', got {target!r}")
        self.sweeps = sweeps
        self.ridge = float(ridge)
        self.tol = float(tol)
        self.target = target

    def target_weights(self, rnd: RoundInput) -> Tensor:
        """``w`` (``(U,)`` float64) of the target ``W̄ = Σ w_u B̃_u A_u``."""
        if self.target == "mean":
            return rnd.weights.clone()
        if self.target == "uniform":
            return torch.full((rnd.n,), 1.0 / rnd.n, dtype=_F64)
        return torch.ones(rnd.n, dtype=_F64)

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """Per module: ALS mixing vectors ``p, q``; state ``{"A": Σ p_u A_u, "B": Σ q_u B̃_u}``."""
        w = self.target_weights(rnd)
        state = ServerState(method=self.name)
        f_start = 0.0
        f_end = 0.0
        n_sweeps: dict[str, int] = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            p, q, hist = florana_mixing(
                [f.B for f in fs],
                [f.A for f in fs],
                w,
                sweeps=self.sweeps,
                ridge=self.ridge,
                tol=self.tol,
            )
            state.tensors[m] = {
                "A": weighted_sum([f.A for f in fs], p),
                "B": weighted_sum([f.B for f in fs], q),
            }
            f_start += hist[0]
            f_end += hist[-1]
            n_sweeps[m] = len(hist) - 1
        state.diagnostics = {
            "objective_start": f_start,
            "objective_end": f_end,
            "sweeps": n_sweeps,
        }
        return state
