"""FlexLoRA: dense average plus SVD redistribution (methods.md §6.6).

Per module, with folded client factors ``B̃_i`` (d×r_i), ``A_i`` (r_i×k) and weights ``p_i``:

1. the dense aggregate ``ΔW_g = Σ_i p_i B̃_i A_i`` (d×k) is formed — FlexLoRA is the dense
   baseline, so this rule deliberately costs ``O(d k S)`` time and ``O(d k)`` memory;
2. its thin SVD ``ΔW_g = U diag(S) Vᵀ`` (``torch.linalg.svd``, ``full_matrices=False``) is cut to
   the top ``q = min(Σ r_i, d, k)`` components and stored as ``"U"`` (d×q), ``"S"`` (q,),
   ``"V"`` (k×q);
3. a client of rank ``r`` receives ``B = U[:, :r] diag(S[:r])``, ``A = V[:, :r]ᵀ`` (all of ``Σ``
   in ``B``, the authors' ``distribute_weight_fast``), or with ``split="sqrt"``
   ``B = U[:, :r] diag(√S[:r])``, ``A = diag(√S[:r]) V[:, :r]ᵀ``.

Ranks may differ between clients (native support: every client gets a truncation of one SVD).
"""

from __future__ import annotations

from typing import Literal

import torch

from glora.aggregators.base import Aggregator, fill_to_rank
from glora.types import LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["FlexLoRA"]


class FlexLoRA(Aggregator):
    """FlexLoRA (Bai et al., NeurIPS 2024): truncated SVD of the dense weighted average.

    Args:
        split: where the singular values go in the readout: ``"B"`` (all of ``Σ`` in ``B``, the
            authors' code) or ``"sqrt"`` (``Σ^{1/2}`` on both factors).
        **base: options of :class:`~glora.aggregators.base.Aggregator`.
    """

    name = "flexlora"
    mixed_ranks = True

    def __init__(self, *, split: Literal["B", "sqrt"] = "B", **base: object) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if split not in ("B", "sqrt"):
            raise ValueError(f"split must be 'B' or 'sqrt', got {split!r}")
        self.split = split

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """Per module: ``ΔW_g = Σ p_i B̃_i A_i`` (d×k) and its top-``q`` SVD ``U, S, V``."""
        p = rnd.p()
        state = ServerState(method=self.name)
        spectra: dict[str, list[float]] = {}
        for m in rnd.modules:
            fs = rnd.factors[m]
            d, k = rnd.shapes[m]
            dense = fs[0].B @ (fs[0].A * p[0])
            for i in range(1, rnd.n):
                dense = dense + fs[i].B @ (fs[i].A * p[i])
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            del dense
            q = min(sum(rnd.ranks[m]), d, k)
            state.tensors[m] = {
                "U": U[:, :q].contiguous(),
                "S": S[:q].contiguous(),
                "V": Vh[:q].mT.contiguous(),
            }
            spectra[m] = [float(x) for x in S[:q]]
        state.diagnostics = {"spectrum": spectra}
        return state

    def _readout(self, state: ServerState, rank: int | None) -> dict[str, LoRAFactors]:
        """Rank-``r`` factors from the stored SVD (``r=None``: all ``q`` components).

        Components with a zero singular value (``σ ≤ eps·max(d, k)·σ_max``) are dropped and
        replaced by fresh ones (``A`` random, ``B`` zero) via :func:`fill_to_rank`.
        """
        out: dict[str, LoRAFactors] = {}
        for m, named in state.tensors.items():
            U, S, V = named["U"], named["S"], named["V"]
            q = int(S.shape[0])
            r = q if rank is None else rank
            if q > 0:
                tol = torch.finfo(S.dtype).eps * max(U.shape[0], V.shape[0]) * S[0]
                n_eff = min(r, q, int((tol < S).sum()))
            else:
                n_eff = 0
            s = S[:n_eff]
            if self.split == "B":
                B = U[:, :n_eff] * s
                A = V[:, :n_eff].mT
            else:
                root = s.sqrt()
                B = U[:, :n_eff] * root
                A = root.unsqueeze(-1) * V[:, :n_eff].mT
            f = LoRAFactors(A=A.contiguous(), B=B.contiguous())
            out[m] = fill_to_rank(f, r, seed=self.fresh_seed(state, m))
        return out
