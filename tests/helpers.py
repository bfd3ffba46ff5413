"""Shared test helpers: random client updates and the dense oracle Σ p_i B_i A_i."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora import ClientUpdate, LoRAFactors


def random_updates(
    ranks: Sequence[int],
    shapes: dict[str, tuple[int, int]] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    weights: Sequence[float] | None = None,
) -> list[ClientUpdate]:
    """One client per rank with random factors on every module (default: two non-square ones)."""
    shapes = shapes or {"layer.0.q": (24, 16), "layer.0.v": (24, 16), "layer.1.out": (12, 20)}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        fs = {
            m: LoRAFactors(
                A=torch.randn(r, k, generator=gen, dtype=torch.float64).to(dtype),
                B=torch.randn(d, r, generator=gen, dtype=torch.float64).to(dtype),
            )
            for m, (d, k) in shapes.items()
        }
        w = float(weights[i]) if weights is not None else float(i + 1)
        out.append(ClientUpdate(f"c{i}", w, fs))
    return out


def oracle(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """The exact weighted average ΔW* = Σ p_i B_i A_i, dense (small layers only)."""
    total = sum(u.weight for u in updates)
    out: dict[str, Tensor] = {}
    for u in updates:
        for m, f in u.factors.items():
            term = (u.weight / total) * f.delta()
            out[m] = term if m not in out else out[m] + term
    return out


def gauge(
    updates: Sequence[ClientUpdate], *, seed: int = 1, orthogonal: bool = False
) -> list[ClientUpdate]:
    """Apply a random per-client, per-module gauge: (B G, G⁻¹ A); products unchanged."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in updates:
        fs = {}
        for m, f in u.factors.items():
            X = torch.randn(f.rank, f.rank, generator=gen, dtype=torch.float64)
            if orthogonal:
                G = torch.linalg.qr(X).Q
            else:
                G = X + 2.0 * torch.eye(f.rank, dtype=torch.float64)  # well-conditioned invertible
            G = G.to(f.dtype)
            fs[m] = LoRAFactors(A=torch.linalg.solve(G, f.A), B=f.B @ G)
        out.append(ClientUpdate(u.client_id, u.weight, fs))
    return out


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius distance ‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def products(factors: dict[str, LoRAFactors]) -> dict[str, Tensor]:
    return {m: f.delta() for m, f in factors.items()}
