"""FedIT: FedAvg of the LoRA factors (methods.md §6.1).

``Ā = Σ p_i A_i``, ``B̄ = Σ p_i B̃_i``; clients continue from ``(B̄, Ā)``. The effective update
``B̄ Ā`` contains cross terms ``B̃_i A_j`` and is not gauge-invariant. Defined for one rank; with
``pad=True`` clients are zero-padded to the largest rank (the usual "zero-padding" baseline).
"""

from __future__ import annotations

from glora.aggregators.base import Aggregator, weighted_sum
from glora.types import ServerState
from glora.validation import RoundInput

__all__ = ["FedIT", "fedavg_factors"]


def fedavg_factors(rnd: RoundInput, agg: Aggregator) -> dict[str, dict]:
    """Per module ``{"A": Σ p_i A_i, "B": Σ p_i B̃_i}``, zero-padded to the largest rank."""
    p = rnd.p()
    out = {}
    for m in rnd.modules:
        fs = agg._same_rank_factors(rnd, m)
        out[m] = {"A": weighted_sum([f.A for f in fs], p), "B": weighted_sum([f.B for f in fs], p)}
    return out


class FedIT(Aggregator):
    """Federated instruction tuning (Zhang et al., ICASSP 2024): average ``A`` and ``B``."""

    name = "fedit"

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        return ServerState(method=self.name, tensors=fedavg_factors(rnd, self))
