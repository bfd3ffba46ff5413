"""RoLoRA: alternate which factor is trained and averaged (methods.md §6.9).

In round ``t`` (1-based) clients train only one factor ``X`` (``first`` in odd rounds, the other in
even rounds) and keep the other frozen at the shared server value. The server averages ``X``
(``Ā = Σ p_i A_i`` r×k, or ``B̄ = Σ p_i B̃_i`` d×r) and keeps the frozen factor from its previous
state, so ``B A`` of the new state is the exact average ``Σ p_i B̃_i A_i`` whenever the clients
share the frozen factor. Defined for one rank; ``pad=True`` zero-pads to the largest rank.
"""

from __future__ import annotations

from typing import Literal

from glora.aggregators.base import Aggregator, fill_to_rank, weighted_sum
from glora.types import ClientPlan, ServerState
from glora.validation import RoundInput

__all__ = ["RoLoRA"]


class RoLoRA(Aggregator):
    """RoLoRA (Chen et al., NeurIPS 2025): alternating training of ``A`` and ``B``.

    Args:
        first: the factor trained in odd rounds (``"B"`` by default: with the standard init
            ``B = 0``, training only ``A`` first gives no gradient).

    The frozen factor of round ``t`` is taken from the previous state as a client of the round's
    rank received it (truncated, or extended with the readout's fresh components); before any
    state it is the weighted average of the clients' frozen factors.
    """

    name = "rolora"

    def __init__(self, *, first: Literal["A", "B"] = "B", **base: object) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if first not in ("A", "B"):
            raise ValueError(f"first must be 'A' or 'B', got {first!r}")
        self.first = first

    def trained_factor(self, round: int) -> str:
        """The factor trained in ``round`` (1-based): ``first`` if odd, the other if even."""
        other = "A" if self.first == "B" else "B"
        return self.first if round % 2 == 1 else other

    def client_plan(self, round: int) -> ClientPlan:
        """Train and upload the round's factor only; download both."""
        x = frozenset({self.trained_factor(round)})
        return ClientPlan(train=x, upload=x)

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        t = self.next_round(prev)
        x = self.trained_factor(t)
        frozen = "B" if x == "A" else "A"
        p = rnd.p()
        tensors = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            r = fs[0].rank
            new = {x: weighted_sum([getattr(f, x) for f in fs], p)}
            prev_f = self._prev_adapter(prev, m)
            if prev_f is None:
                new[frozen] = weighted_sum([getattr(f, frozen) for f in fs], p)
            else:
                assert prev is not None
                start = fill_to_rank(prev_f.to(rnd.dtype), r, seed=self.fresh_seed(prev, m))
                new[frozen] = getattr(start, frozen).clone()
            tensors[m] = {"A": new["A"], "B": new["B"]}
        return ServerState(method=self.name, tensors=tensors)
