"""Robust aggregation helpers: a norm-based outlier guard usable with any aggregator.

The guard looks at each client's whole update norm
``‖ΔW_i‖ = sqrt(Σ_modules ‖B̃_i A_i‖_F²)`` (computed in factored form, never forming a ``d×k``
matrix) and compares it with ``multiple × median`` over the round:

* ``mode="reject"``: clients above the threshold are dropped and the remaining weights are
  renormalised (never all clients: the median client is always kept when ``multiple ≥ 1``);
* ``mode="clip"``: their ``B̃`` factors are scaled down so that their norm equals the threshold.

A round of one client, or one whose median norm is zero, is returned unchanged. The function is
pure: the input :class:`~glora.validation.RoundInput` and its tensors are never mutated.
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from glora.linalg import product_fro_norm_sq
from glora.types import LoRAFactors
from glora.validation import RoundInput

__all__ = ["NORM_GUARD_MODES", "apply_norm_guard", "check_norm_guard_options", "update_norms"]

#: Accepted values of the guard's ``mode``.
NORM_GUARD_MODES: tuple[str, ...] = ("reject", "clip")


def check_norm_guard_options(multiple: object, mode: object) -> None:
    """Raise ``ValueError`` naming the option unless ``multiple``/``mode`` are valid guard options.

    ``multiple`` must be ``None`` (guard off) or a finite real number ``≥ 1`` (a threshold below
    the median would drop about half of every round); ``mode`` must be ``"reject"`` or ``"clip"``.
    """
    if multiple is not None and (
        isinstance(multiple, bool)
        or not isinstance(multiple, numbers.Real)
        or not math.isfinite(float(multiple))
        or float(multiple) < 1
    ):
        raise ValueError(
            f"norm_guard must be None or a finite number >= 1 (a multiple of the round's median "
            f"update norm), got {multiple!r}"
        )
    if not isinstance(mode, str) or mode not in NORM_GUARD_MODES:
        raise ValueError(f"norm_guard_mode must be 'reject' or 'clip', got {mode!r}")


def update_norms(rnd: RoundInput) -> Tensor:
    """Per-client update norms ``sqrt(Σ_m ‖B̃_i A_i‖_F²)`` as an ``(n,)`` float64 tensor.

    Computed in factored form (:func:`glora.linalg.product_fro_norm_sq`) in float64, so that
    large-but-valid entries cannot overflow.
    """
    total = torch.zeros(rnd.n, dtype=torch.float64)
    for m in rnd.modules:
        for i, f in enumerate(rnd.factors[m]):
            sq = product_fro_norm_sq(f.B.to(torch.float64), f.A.to(torch.float64))
            total[i] += sq.clamp_min(0).cpu()
    return total.sqrt()


def apply_norm_guard(
    rnd: RoundInput, multiple: float, mode: Literal["reject", "clip"] = "reject"
) -> tuple[RoundInput, dict[str, str]]:
    """Drop or clip the clients whose update norm exceeds ``multiple × median``.

    The median is over the round's client norms (the mean of the two middle ones for an even
    number of clients); the comparison is strict, so a client exactly at the threshold is kept.

    Args:
        rnd: a validated round.
        multiple: the threshold as a multiple of the round's median update norm (``≥ 1``).
        mode: ``"reject"`` (drop the outliers, renormalise the weights of the others) or
            ``"clip"`` (scale the outliers' ``B̃`` so that their norm equals the threshold).

    Returns:
        ``(round, actions)``: the guarded round (``rnd`` itself when nothing happened) and
        ``{client_id: reason}`` for every client that was rejected or clipped.

    Raises:
        ValueError: a bad ``multiple`` or ``mode`` (the message names the option).
    """
    check_norm_guard_options(multiple, mode)
    if multiple is None:
        raise ValueError("norm_guard must be a number to apply the guard, got None")
    if rnd.n < 2:
        return rnd, {}
    norms = update_norms(rnd)
    values = [float(x) for x in norms]
    median = statistics.median(values)
    threshold = float(multiple) * median
    if not math.isfinite(threshold) or threshold <= 0:
        return rnd, {}
    outliers = [i for i, v in enumerate(values) if v > threshold]
    if not outliers:
        return rnd, {}
    actions: dict[str, str] = {}
    if mode == "reject":
        keep = [i for i in range(rnd.n) if i not in set(outliers)]
        if not keep:  # cannot happen with multiple >= 1; never drop a whole round
            return rnd, {}
        for i in outliers:
            actions[rnd.client_ids[i]] = (
                f"rejected: update norm {values[i]:.4g} > {float(multiple):g} × median "
                f"{median:.4g} = {threshold:.4g}"
            )
        idx = torch.tensor(keep, dtype=torch.long)
        w = rnd.weights.index_select(0, idx)
        guarded = replace(
            rnd,
            client_ids=tuple(rnd.client_ids[i] for i in keep),
            weights=w / w.sum(),
            ranks={m: tuple(r[i] for i in keep) for m, r in rnd.ranks.items()},
            factors={m: [fs[i] for i in keep] for m, fs in rnd.factors.items()},
            extra=tuple(rnd.extra[i] for i in keep),
        )
        return guarded, actions
    scales = {i: threshold / values[i] for i in outliers}
    for i in outliers:
        actions[rnd.client_ids[i]] = (
            f"clipped: update norm {values[i]:.4g} > {float(multiple):g} × median {median:.4g}; "
            f"B scaled by {scales[i]:.4g}"
        )
    factors: dict[str, list[LoRAFactors]] = {}
    for m, fs in rnd.factors.items():
        factors[m] = [
            LoRAFactors(A=f.A, B=f.B * scales[i]) if i in scales else f for i, f in enumerate(fs)
        ]
    return replace(rnd, factors=factors), actions
