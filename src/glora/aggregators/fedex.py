"""FedEx-LoRA: FedAvg of the factors plus an exact residual folded into the base (methods.md §6.5).

Per module, with folded client factors ``B̃_i`` (d×r), ``A_i`` (r×k) and weights ``p_i``:
``Ā = Σ p_i A_i`` (r×k), ``B̄ = Σ p_i B̃_i`` (d×r) as FedIT, and the residual
``ΔW_res = Σ p_i B̃_i A_i − B̄ Ā`` in factored form
``B_res = [B̃_1, …, B̃_n, B̄]`` (d×(n+1)r), ``A_res = [p_1 A_1; …; p_n A_n; −Ā]`` ((n+1)r×k).
The residual is added to the cumulative base delta (shared helper
:func:`glora.aggregators.flora.accumulate_base_delta`, exact re-compression past ``min(d, k)``)
and clients continue from ``(B̄, Ā)``, so the effective model ``base_delta + B̄ Ā`` carries the
exact average. Defined for one rank; ``pad=True`` zero-pads to the largest rank.
"""

from __future__ import annotations

import torch

from glora.aggregators.base import Aggregator, weighted_sum
from glora.aggregators.flora import base_delta_state
from glora.types import LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["FedExLoRA"]


class FedExLoRA(Aggregator):
    """FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation via a residual base update.

    State per module: ``{"A": Ā, "B": B̄}`` plus the cumulative ``base_delta``;
    ``info["base_delta_increments"]`` records the bytes of each round's factored residual
    (``(n + 1) r (d + k)`` numbers per module).
    """

    name = "fedex"

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        p = rnd.p()
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        residuals: dict[str, LoRAFactors] = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            A_bar = weighted_sum([f.A for f in fs], p)
            B_bar = weighted_sum([f.B for f in fs], p)
            B_res = torch.cat([*(f.B for f in fs), B_bar], dim=1)
            A_res = torch.cat([*(f.A * p[i] for i, f in enumerate(fs)), -A_bar], dim=0)
            residuals[m] = LoRAFactors(A=A_res, B=B_res)
            tensors[m] = {"A": A_bar, "B": B_bar}
        return base_delta_state(self.name, prev, tensors, residuals)
