"""FedRot-LoRA: client-side rotational alignment before FedAvg (methods.md §4).

Server: FedIT, ``Ā = Σ p_i A_i``, ``B̄ = Σ p_i B̃_i``
(:func:`~glora.aggregators.fedit.fedavg_factors`).

Client (:meth:`FedRotLoRA.prepare_upload`), per module, after local training: the trained folded
factors ``(B̃, A)`` (d×r, r×k) are rotated towards the reference ``(B̃_ref, A_ref)`` the client
received at the start of the round (same rank ``r``):

* round 1: no alignment; from round 2, with ``idx = round − 1``: odd ``idx`` aligns ``A``, even
  ``idx`` aligns ``B`` (the authors' alternation);
* align ``A``: ``M = A A_refᵀ`` (r×r); align ``B``: ``M = B̃ᵀ B̃_ref`` (r×r);
  ``R* = procrustes(M)`` maximises ``tr(Rᵀ M)`` (with ``det_fix`` a proper rotation, Kabsch);
* soft alignment: ``R = polar((1 − λ) I + λ R*)`` for ``λ < 1``, ``R = R*`` for ``λ ≥ 1``,
  ``R = I`` for ``λ = 0`` or a (numerically) zero ``M``;
* upload ``B̃' = B̃ R``, ``A' = Rᵀ A``: the product ``B̃' A' = B̃ A`` is unchanged.

Cost ``O((d or k) r² + r³)`` per module; no ``d×k`` matrix. The server rule is defined for one
rank (``pad=True`` zero-pads, labelled as our extension); alignment runs at the client's rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from glora.aggregators.base import Aggregator
from glora.aggregators.fedit import fedavg_factors
from glora.linalg import polar, procrustes
from glora.types import Factor, LoRAFactors, ServerState
from glora.validation import RoundInput

__all__ = ["FedRotLoRA", "align_factor", "align_pair", "alignment_rotation"]

_F64 = torch.float64


def align_factor(round: int) -> Factor | None:
    """The factor aligned in (1-based) ``round``: None in round 1, then ``A`` / ``B`` alternately.

    With ``idx = round − 1``: odd ``idx`` → ``"A"``, even ``idx ≥ 2`` → ``"B"``.
    """
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise ValueError(f"round must be a positive integer (1-based), got {round!r}")
    idx = round - 1
    if idx == 0:
        return None
    return "A" if idx % 2 == 1 else "B"


def alignment_rotation(M: Tensor, *, lam: float, det_fix: bool = True) -> Tensor:
    """The ``r×r`` orthogonal ``R`` (float64) that aligns with cross-Gram ``M`` (r×r).

    ``R* = procrustes(M, det_fix)``; ``R = R*`` for ``λ ≥ 1``, ``polar((1 − λ) I + λ R*)`` for
    ``0 < λ < 1`` and ``I`` for ``λ = 0`` or ``M ≈ 0`` (``‖M‖_F = 0``).
    """
    r = M.shape[-1]
    eye = torch.eye(r, dtype=_F64, device=M.device)
    Md = M.to(_F64)
    if lam <= 0 or not bool(torch.isfinite(Md).all()) or float(torch.linalg.matrix_norm(Md)) == 0:
        return eye
    R_star = procrustes(Md, det_fix=det_fix)
    if lam >= 1:
        return R_star
    return polar((1 - lam) * eye + lam * R_star)


def align_pair(
    B: Tensor,
    A: Tensor,
    B_ref: Tensor,
    A_ref: Tensor,
    factor: Factor,
    lam: float = 1.0,
    det_fix: bool = True,
) -> LoRAFactors:
    """Rotate the pair ``(B̃, A)`` (d×r, r×k) so that ``factor`` moves towards the reference.

    ``factor="A"``: ``M = A A_refᵀ``; ``factor="B"``: ``M = B̃ᵀ B̃_ref``; ``R`` from
    :func:`alignment_rotation`; returns ``LoRAFactors(A=Rᵀ A, B=B̃ R)`` in the input dtype (the
    product is unchanged). ``M`` counts as zero when ``‖M‖_F ≤ eps · ‖X‖_F ‖X_ref‖_F``.
    """
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    if A.shape != A_ref.shape or B.shape != B_ref.shape:
        raise ValueError(
            f"alignment needs the reference at the client's shape: A {tuple(A.shape)} vs "
            f"{tuple(A_ref.shape)}, B {tuple(B.shape)} vs {tuple(B_ref.shape)}"
        )
    dtype = A.dtype
    Ad, Bd = A.to(_F64), B.to(_F64)
    X, X_ref = (Ad, A_ref.to(_F64)) if factor == "A" else (Bd.mT, B_ref.to(_F64).mT)
    M = X @ X_ref.mT  # r×r: A A_refᵀ or B̃ᵀ B̃_ref
    bound = float(torch.linalg.matrix_norm(X)) * float(torch.linalg.matrix_norm(X_ref))
    if float(torch.linalg.matrix_norm(M)) <= torch.finfo(_F64).eps * bound:
        return LoRAFactors(A=A, B=B)
    R = alignment_rotation(M, lam=lam, det_fix=det_fix)
    return LoRAFactors(A=(R.mT @ Ad).to(dtype), B=(Bd @ R).to(dtype))


class FedRotLoRA(Aggregator):
    """FedRot-LoRA (Zhang et al., ICML 2026): rotational alignment on clients, FedIT on the server.

    Args:
        lam: soft alignment strength ``λ ≥ 0`` (0 = no alignment = FedIT; ``λ ≥ 1`` = hard
            Procrustes).
        det_fix: restrict ``R*`` to proper rotations (``det R* = +1``).
        **base: options of :class:`~glora.aggregators.base.Aggregator`.
    """

    name = "fedrot"

    def __init__(self, *, lam: float = 0.5, det_fix: bool = True, **base: object) -> None:
        super().__init__(**base)  # type: ignore[arg-type]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
            raise ValueError(
                f"lam must be a finite number >= 0 (>= 1 = hard alignment), got {lam!r}"
            )
        if not isinstance(det_fix, bool):
            raise ValueError(f"det_fix must be true or false, got {det_fix!r}")
        self.lam = float(lam)
        self.det_fix = det_fix

    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """FedIT: per module ``{"A": Σ p_i A_i, "B": Σ p_i B̃_i}``."""
        return ServerState(method=self.name, tensors=fedavg_factors(rnd, self))

    def prepare_upload(
        self,
        round: int,
        received: Mapping[str, LoRAFactors],
        trained: Mapping[str, LoRAFactors],
    ) -> dict[str, LoRAFactors]:
        """Align every module of ``trained`` to ``received`` (see the module docstring).

        Raises:
            ValueError: a module of ``trained`` has no reference in ``received``, or ranks differ.
        """
        factor = align_factor(round)
        if factor is None or self.lam == 0:
            return dict(trained)
        out: dict[str, LoRAFactors] = {}
        for m, f in trained.items():
            ref = received.get(m)
            if ref is None:
                raise ValueError(f"module {m!r}: no received reference to align to")
            out[m] = align_pair(f.B, f.A, ref.B, ref.A, factor, self.lam, self.det_fix)
        return out
