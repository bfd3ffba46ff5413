"""HetLoRA: zero-padding with sparsity-weighted averaging (methods.md §6.7).

Per module, every client's folded factors are zero-padded to ``r_max = max_i r_i``
(``A_i`` → r_max×k, ``B̃_i`` → d×r_max) and averaged with one weight per client:

* ``weighting="norm"`` (the paper): ``w_i = ν_i / Σ_j ν_j`` with
  ``ν_i = ‖ΔW_i‖_F = sqrt(Σ_modules ‖B̃_i A_i‖_F²)``, the norm of the client's whole update
  (computed in factored form, ``‖B A‖_F² = tr(BᵀB · AAᵀ)``); if every ``ν_i`` is zero the FedAvg
  weights ``p_i`` are used;
* ``weighting="fedavg"``: ``w_i = p_i`` (the plain "zero-padding" baseline).

State ``{"A": Ā = Σ w_i A_i (r_max×k), "B": B̄ = Σ w_i B̃_i (d×r_max)}``; a client of rank ``r``
receives the first ``r`` components (truncation, the base readout).

The paper's local rank self-pruning is a client-side loss term, :func:`hetlora_penalty`; the
aggregator stores ``prune_lambda`` for engines that support it and never changes ranks itself.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator, pad_factors, weighted_sum
from glora.linalg import product_fro_norm_sq
from glora.types import ServerState
from glora.validation import RoundInput

__all__ = ["HetLoRA", "hetlora_penalty"]


def hetlora_penalty(lora_A: Tensor, lora_B: Tensor, keep: int) -> Tensor:
    """HetLoRA's rank self-pruning regulariser ``‖A[keep:]‖_F · ‖B[:, keep:]‖_F`` (a scalar).

    ``lora_A`` is r×k, ``lora_B`` d×r; the trailing ``r − keep`` components are penalised (the
    form of the third-party reimplementation; multiply by ``λ`` in the local loss). Zero when
    ``keep ≥ r``. Differentiable in both factors.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
    return torch.linalg.matrix_norm(lora_A[keep:]) * torch.linalg.matrix_norm(lora_B[:, keep:])


class HetLoRA(Aggregator):
    """HetLoRA (Cho et al., EMNLP 2024): zero-pad to ``r_max`` and average with norm weights.

    Args:
        weighting: ``"norm"`` (sparsity weights ``w_i ∝ ‖B̃_i A_i‖_F``, the paper) or
            ``"fedavg"`` (``w_i = p_i``, the zero-padding baseline).
        prune_lambda: strength ``λ ≥ 0`` of the client-side self-pruning loss
            ``λ · hetlora_penalty(...)``; used by engines that support it (the aggregator itself
            ignores it).
        **base: options of :class:`~glora.aggregators.base.Aggregator`.
    """

    name = "hetlora"
    mixed_ranks = True

    def __init__(
        self,
        *,
        weighting: Literal["norm", "fedavg"] = "norm",
        prune_lambda: float = 0.0,
        **base: object,
    ) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if weighting not in ("norm", "fedavg"):
            raise ValueError(f"weighting must be 'norm' or 'fedavg', got {weighting!r}")
        if (
            isinstance(prune_lambda, bool)
            or not isinstance(prune_lambda, (int, float))
            or not math.isfinite(prune_lambda)
            or prune_lambda < 0
        ):
            raise ValueError(f"prune_lambda must be a finite number >= 0, got {prune_lambda!r}")
        self.weighting = weighting
        self.prune_lambda = float(prune_lambda)

    def client_weights(self, rnd: RoundInput) -> Tensor:
        """The per-client aggregation weights ``w`` (``(n,)`` float64, summing to 1)."""
        p = rnd.weights
        if self.weighting == "fedavg":
            return p
        norm2 = torch.zeros(rnd.n, dtype=torch.float64)
        for m in rnd.modules:
            for i, f in enumerate(rnd.factors[m]):
                norm2[i] += product_fro_norm_sq(f.B.to(torch.float64), f.A.to(torch.float64))
        nu = norm2.clamp_min(0).sqrt()
        total = float(nu.sum())
        if not math.isfinite(total) or total <= 0:
            return p
        return nu / total

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """Per module: ``Ā = Σ w_i pad(A_i)``, ``B̄ = Σ w_i pad(B̃_i)`` at rank ``r_max``."""
        w = self.client_weights(rnd)
        state = ServerState(method=self.name)
        for m in rnd.modules:
            fs = pad_factors(rnd.factors[m], rnd.max_rank(m))
            state.tensors[m] = {
                "A": weighted_sum([f.A for f in fs], w),
                "B": weighted_sum([f.B for f in fs], w),
            }
        state.diagnostics = {
            "weights": {cid: float(x) for cid, x in zip(rnd.client_ids, w, strict=True)}
        }
        return state
