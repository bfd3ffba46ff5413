"""LoRA-FAIR: FedIT plus a server-side correction of ``B`` (methods.md §6.8).

Per module, with folded client factors ``B̃_i`` (d×r), ``A_i`` (r×k) and weights ``p_i``:
``Ā = Σ p_i A_i`` (r×k), ``B̄ = Σ p_i B̃_i`` (d×r), the ideal update ``W̄ = Σ p_i B̃_i A_i`` (d×k,
never formed). The server looks for a correction ``ΔB`` (d×r) and broadcasts ``(B̄ + ΔB, Ā)``:

* ``solver="cosine"`` (the paper): minimise ``1 − cos(W̄, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F`` with Adam
  (``steps`` iterations from ``ΔB = 0``; the best iterate is kept). Everything is in factored
  form: with ``X = B̄ + ΔB``, ``P = W̄ Āᵀ = Σ p_i B̃_i (A_i Āᵀ)`` (d×r) and ``G = Ā Āᵀ`` (r×r),
  ``⟨W̄, X Ā⟩ = ⟨X, P⟩``, ``‖X Ā‖_F² = tr(XᵀX · G)`` and ``‖W̄‖_F²`` from ``r×r`` Gram blocks.
  Adam's step size is ``lr · rms(B̄)`` with ``rms(B̄) = ‖B̄‖_F / √(d r)`` (the solver is
  internally parametrised as ``ΔB = rms(B̄) · Z``), so it does not depend on the scale of the
  factors; the ``λ ‖ΔB‖_F`` term is the paper's, in absolute units. The solve runs in float64.
* ``solver="ridge"`` (our closed-form variant, "LoRA-FAIR (ridge)", not the paper's method):
  ``ΔB = (W̄ − B̄Ā) Āᵀ (ĀĀᵀ + λ I)⁻¹ = (P − B̄ G)(G + λ I)⁻¹``, the minimiser of
  ``‖W̄ − (B̄ + ΔB) Ā‖_F² + λ ‖ΔB‖_F²``.

Cost ``O(n r² (d + k))`` plus ``O(steps · d r²)``; no ``d×k`` matrix. Defined for one rank
(``pad=True`` zero-pads to the largest rank, labelled as our extension).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator, weighted_sum
from glora.linalg import weighted_product_fro_norm_sq
from glora.types import ServerState
from glora.validation import RoundInput

__all__ = ["LoRAFAIR"]

_F64 = torch.float64


def _cosine(inner: Tensor, w_norm: float, x_norm2: Tensor) -> Tensor:
    """``inner / (‖W̄‖ · ‖XĀ‖)`` with zero for a zero denominator."""
    den = w_norm * x_norm2.clamp_min(0).sqrt()
    return inner / den if float(den) > 0 else torch.zeros((), dtype=inner.dtype)


class LoRAFAIR(Aggregator):
    """LoRA-FAIR (Bian et al., ICCV 2025): refine the averaged ``B`` towards the ideal update.

    Args:
        solver: ``"cosine"`` (the paper's cosine loss, solved by Adam) or ``"ridge"`` (our
            closed-form least-squares variant).
        lam: regularisation strength ``λ ≥ 0`` (``λ ‖ΔB‖_F`` for cosine, ``λ ‖ΔB‖_F²`` for ridge).
        steps: Adam iterations of the cosine solver (0 = FedIT).
        lr: Adam step size of the cosine solver, relative to the RMS entry of ``B̄``.
        **base: options of :class:`~glora.aggregators.base.Aggregator`.
    """

    name = "lorafair"

    def __init__(
        self,
        *,
        solver: Literal["cosine", "ridge"] = "cosine",
        lam: float = 0.01,
        steps: int = 200,
        lr: float = 0.05,
        **base: object,
    ) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if solver not in ("cosine", "ridge"):
            raise ValueError(f"solver must be 'cosine' or 'ridge', got {solver!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.solver = solver
        self.lam = float(lam)
        self.steps = steps
        self.lr = float(lr)

    # ------------------------------------------------------------------ solvers
    def _solve_cosine(self, Bbar: Tensor, P: Tensor, G: Tensor, w_norm: float) -> Tensor:
        """Adam on ``1 − cos(W̄, (B̄ + ΔB)Ā) + λ‖ΔB‖_F``; returns the best ``ΔB`` (d×r, float64)."""
        d, r = Bbar.shape
        zero = torch.zeros_like(Bbar)
        scale = float(torch.linalg.matrix_norm(Bbar)) / math.sqrt(d * r)
        x_norm2 = ((Bbar.mT @ Bbar) * G).sum()
        if self.steps == 0 or w_norm <= 0 or scale <= 0 or float(x_norm2) <= 0:
            return zero  # cosine undefined at the start (B̄Ā = 0 or W̄ = 0): keep FedIT

        def loss_of(Z: Tensor) -> Tensor:
            X = Bbar + scale * Z
            cos = (X * P).sum() / (w_norm * ((X.mT @ X) * G).sum().clamp_min(1e-300).sqrt())
            return 1 - cos + self.lam * scale * torch.linalg.matrix_norm(Z)

        with torch.enable_grad():
            Z = torch.zeros_like(Bbar, requires_grad=True)
            opt = torch.optim.Adam([Z], lr=self.lr)
            best_loss = math.inf
            best = zero
            for it in range(self.steps + 1):
                opt.zero_grad()
                loss = loss_of(Z)
                value = float(loss.detach())
                if math.isfinite(value) and value < best_loss:
                    best_loss = value
                    best = (scale * Z).detach().clone()
                if it == self.steps:
                    break
                loss.backward()
                opt.step()
        return best

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """Per module: FedIT's ``(B̄, Ā)``, then ``B̄ ← B̄ + ΔB`` from the chosen solver."""
        p = rnd.p(_F64)
        state = ServerState(method=self.name)
        cos_before: dict[str, float] = {}
        cos_after: dict[str, float] = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            As = [f.A.to(_F64) for f in fs]
            Bs = [f.B.to(_F64) for f in fs]
            Abar = weighted_sum(As, p)  # r×k
            Bbar = weighted_sum(Bs, p)  # d×r
            G = Abar @ Abar.mT  # r×r
            P = weighted_sum([B @ (A @ Abar.mT) for A, B in zip(As, Bs, strict=True)], p)  # d×r
            w_norm = math.sqrt(max(float(weighted_product_fro_norm_sq(Bs, As, p)), 0.0))
            if self.solver == "ridge":
                rhs = P - Bbar @ G  # (W̄ − B̄Ā)Āᵀ
                Mreg = G + self.lam * torch.eye(G.shape[0], dtype=_F64)
                if self.lam > 0:
                    dB = torch.linalg.solve(Mreg, rhs.mT).mT
                else:
                    dB = rhs @ torch.linalg.pinv(Mreg, hermitian=True)
            else:
                dB = self._solve_cosine(Bbar, P, G, w_norm)
            X = Bbar + dB
            cos_before[m] = float(_cosine((Bbar * P).sum(), w_norm, ((Bbar.mT @ Bbar) * G).sum()))
            cos_after[m] = float(_cosine((X * P).sum(), w_norm, ((X.mT @ X) * G).sum()))
            dtype = rnd.dtype
            state.tensors[m] = {"A": Abar.to(dtype), "B": X.to(dtype)}
        state.diagnostics = {
            "solver": self.solver,
            "cosine_before": cos_before,
            "cosine_after": cos_after,
            "cosine_before_mean": sum(cos_before.values()) / len(cos_before),
            "cosine_after_mean": sum(cos_after.values()) / len(cos_after),
        }
        return state
