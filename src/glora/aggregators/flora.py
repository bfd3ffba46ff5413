"""FLoRA: stacking aggregation with a cumulative base-weight update (methods.md §6.4).

Per module, with folded client factors ``B̃_i`` (d×r_i), ``A_i`` (r_i×k) and weights ``p_i``:
``B_stack = [B̃_1, …, B̃_n]`` (d×S) and ``A_stack = [p_1 A_1; …; p_n A_n]`` (S×k), ``S = Σ r_i``,
so that ``B_stack @ A_stack = Σ p_i B̃_i A_i = ΔW*`` exactly, for any ranks. The stack is added to
the cumulative base delta (``W0 ← W0 + B_stack A_stack`` on every client) and clients restart
from a fresh LoRA (``A`` random, ``B = 0``) every round.

:func:`accumulate_base_delta` (shared with FedEx-LoRA) concatenates a round's increment onto the
previous base delta and re-compresses it exactly (a thresholded factored SVD) once its rank
exceeds ``min(d, k)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator
from glora.linalg import compress_exact
from glora.types import LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["FLoRA", "accumulate_base_delta", "base_delta_state", "compress_exact"]


def accumulate_base_delta(
    prev: ServerState | None, increments: Mapping[str, LoRAFactors]
) -> tuple[dict[str, LoRAFactors], dict[str, int]]:
    """Add a round's base-weight increments to the cumulative base delta of ``prev``.

    Per module the new base delta is ``[B_prev, B_inc] · [A_prev; A_inc]`` (d×(r_prev+r_inc) and
    (r_prev+r_inc)×k, the previous factors cast to the increment's dtype), whose product is
    ``B_prev A_prev + B_inc A_inc``; when its rank exceeds ``min(d, k)`` it is re-compressed with
    :func:`compress_exact`.

    Returns:
        ``(base_delta, increments_log)``: the new module → factors, and the byte log
        ``{str(round): bytes}`` carried over from ``prev.info["base_delta_increments"]`` and
        extended with this round's increment bytes (``Σ_m numel × element_size`` of the
        increment's ``A`` and ``B``, before any re-compression), round ``= prev.round + 1``.
    """
    base: dict[str, LoRAFactors] = {}
    nbytes = 0
    for m, inc in increments.items():
        nbytes += inc.nbytes()
        old = prev.base_delta.get(m) if prev is not None else None
        if old is None:
            f = inc
        else:
            f = LoRAFactors(
                A=torch.cat([old.A.to(inc.A.dtype), inc.A], dim=0),
                B=torch.cat([old.B.to(inc.B.dtype), inc.B], dim=1),
            )
        if f.rank > min(f.d, f.k):
            f = compress_exact(f)
        base[m] = f
    log: dict[str, int] = {}
    if prev is not None:
        log.update(prev.info.get("base_delta_increments", {}))
    round_no = Aggregator.next_round(prev)
    log[str(round_no)] = nbytes
    return base, log


def rank_zero_adapter(d: int, k: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """A rank-0 adapter ``{"A": (0, k), "B": (d, 0)}`` of ``like``'s dtype and device."""
    return {"A": like.new_zeros(0, k), "B": like.new_zeros(d, 0)}


def base_delta_state(
    method: str,
    prev: ServerState | None,
    tensors: dict[str, dict[str, Tensor]],
    increments: Mapping[str, LoRAFactors],
) -> ServerState:
    """The new state of a rule that merges ``increments`` into the base weights (FLoRA, FedEx).

    Accumulates the cumulative base delta, records this round's increment bytes in
    ``info["base_delta_increments"]`` and the per-module base-delta ranks in the diagnostics.
    """
    base, log = accumulate_base_delta(prev, increments)
    state = ServerState(method=method, tensors=tensors, base_delta=base)
    state.info["base_delta_increments"] = log
    state.diagnostics = {
        "base_delta_rank": {m: f.rank for m, f in base.items()},
        "increment_bytes": log[str(Aggregator.next_round(prev))],
    }
    return state


class FLoRA(Aggregator):
    """FLoRA (Wang et al., NeurIPS 2024): exact stacking, native mixed ranks.

    State per module: a rank-0 adapter ``{"A": (0, k), "B": (d, 0)}`` (the readout at rank ``r``
    is a fresh LoRA, ``A`` random and ``B = 0``, seeded per round and module) and the cumulative
    ``base_delta`` whose product is ``Σ_t ΔW*_t``. ``info["base_delta_increments"]`` records the
    bytes each round adds to the base delta (the broadcast cost, ``S (d + k)`` per module).
    """

    name = "flora"
    mixed_ranks = True

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        p = rnd.p()
        increments: dict[str, LoRAFactors] = {}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for m in rnd.modules:
            fs = rnd.factors[m]
            B_stack = torch.cat([f.B for f in fs], dim=1)  # d×S
            A_stack = torch.cat([f.A * p[i] for i, f in enumerate(fs)], dim=0)  # S×k
            increments[m] = LoRAFactors(A=A_stack, B=B_stack)
            d, k = rnd.shapes[m]
            tensors[m] = rank_zero_adapter(d, k, A_stack)
        return base_delta_state(self.name, prev, tensors, increments)
