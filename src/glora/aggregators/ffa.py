"""FFA-LoRA: federated LoRA with a frozen, shared ``A`` (methods.md §6.2).

``A`` stays at its shared random initialisation ``A_0`` (r×k) on every client; only ``B`` is
trained, uploaded and averaged: ``B̄ = Σ p_i B̃_i`` (d×r). Because ``A_0`` is common,
``B̄ A_0 = Σ p_i B̃_i A_0`` is the exact average of the clients' updates.

Mixed ranks (our extension, only with ``pad=True``): clients of rank ``r_i`` use the nested
slice ``A_0[:r_i]`` of one shared frozen ``A_0`` of the initial (largest) rank; their ``B̃_i`` are
zero-padded to the round's largest rank, so the average stays exact.
"""

from __future__ import annotations

import torch

from glora.aggregators.base import Aggregator, weighted_sum
from glora.types import ClientPlan, InvalidUpdate, ServerState
from glora.validation import RoundInput

__all__ = ["FFALoRA"]


class FFALoRA(Aggregator):
    """FFA-LoRA (Sun et al., ICLR 2024): train and average ``B`` only, ``A`` frozen at ``A_0``.

    State per module: ``{"A": A_0, "B": B̄}`` with ``A_0`` (R×k) the initial adapter's ``A`` at its
    full rank ``R`` and ``B̄`` (d×R) the average, zero-padded to ``R`` when the round's rank is
    smaller (the product is unchanged; readouts truncate both to the client's rank). A round
    whose (padded) rank exceeds ``R`` raises :class:`InvalidUpdate`: ``A_0`` has no rows for it.
    """

    name = "ffa"

    def _init(self, state: ServerState) -> None:
        """Round 0: ``state.tensors[m]["A"]`` (the initial adapter's ``A``) is kept as ``A_0``."""

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        p = rnd.p()
        tensors = {}
        for m in rnd.modules:
            fs = self._same_rank_factors(rnd, m)
            B_bar = weighted_sum([f.B for f in fs], p)  # d×r
            r = B_bar.shape[1]
            prev_f = self._prev_adapter(prev, m)
            # Without a previous state, Σ p_i A_i = A_0 when the clients kept A frozen.
            A0 = weighted_sum([f.A for f in fs], p) if prev_f is None else prev_f.A.to(rnd.dtype)
            if A0.shape[0] < r:
                raise InvalidUpdate(
                    f"the updates have rank {r} but the frozen A_0 has only {A0.shape[0]} rows; "
                    "initialise the server with an adapter of the largest client rank",
                    module=m,
                )
            if A0.shape[0] > r:
                B_bar = torch.cat([B_bar, B_bar.new_zeros(B_bar.shape[0], A0.shape[0] - r)], dim=1)
            tensors[m] = {"A": A0.clone(), "B": B_bar}
        return ServerState(method=self.name, tensors=tensors)

    def client_plan(self, round: int) -> ClientPlan:
        """Train, upload and download ``B`` only; ``A`` (the shared ``A_0``) stays local."""
        b = frozenset({"B"})
        return ClientPlan(train=b, upload=b, download=b, local=frozenset({"A"}))
