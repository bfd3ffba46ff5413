"""FedSA-LoRA: share ``A``, keep ``B`` personal (methods.md §6.3).

Clients train both factors but upload only ``A``; the server averages ``Ā = Σ p_i A_i`` (r×k) and
each client keeps its own ``B_i`` between rounds (next round it starts from ``(B_i, Ā)``). The rule
reads only the ``A``'s. Defined for one rank; ``pad=True`` zero-pads to the largest rank.

FedSA has no global ``B``: the state's ``B`` is ``B_start`` (d×r), what a client without a local
``B`` starts from (the initial ``B``, zero under the standard init). Hence ``readout(None)``'s
product is ``B_start Ā`` (zero from the standard init) and evaluation is personalised (each
client with its own ``B_i``).
"""

from __future__ import annotations

from glora.aggregators.base import Aggregator, fill_to_rank, weighted_sum
from glora.types import ClientPlan, LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["FedSALoRA"]


class FedSALoRA(Aggregator):
    """FedSA-LoRA (Guo et al., ICLR 2025): average ``A`` only; ``B`` stays on the clients.

    State per module: ``{"A": Ā, "B": B_start}`` with ``Ā`` (r×k) and ``B_start`` (d×r) the previous
    state's ``B`` truncated or zero-extended to ``r`` (zeros when there is no previous state).
    """

    name = "fedsa"

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        p = rnd.p()
        tensors = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            A_bar = weighted_sum([f.A for f in fs], p)  # r×k
            r = A_bar.shape[0]
            d, _ = rnd.shapes[m]
            prev_f = self._prev_adapter(prev, m)
            if prev_f is None:
                B_start = A_bar.new_zeros(d, r)
            else:
                assert prev is not None
                start = fill_to_rank(
                    LoRAFactors(A=prev_f.A.to(rnd.dtype), B=prev_f.B.to(rnd.dtype)),
                    r,
                    seed=self.fresh_seed(prev, m),
                )
                B_start = start.B.clone()
            tensors[m] = {"A": A_bar, "B": B_start}
        return ServerState(method=self.name, tensors=tensors)

    def client_plan(self, round: int) -> ClientPlan:
        """Train both factors; upload and download ``A``; ``B`` stays local."""
        a = frozenset({"A"})
        return ClientPlan(train=frozenset({"A", "B"}), upload=a, download=a, local=frozenset({"B"}))
