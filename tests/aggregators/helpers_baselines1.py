"""Shared test helpers for the FFA/FedSA/FLoRA/FedEx/RoLoRA aggregator tests.

Small non-square layers (``d = 24``, ``k = 16``) and a dense oracle ``ΔW* = Σ p_i B̃_i A_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora.linalg import fresh_factors
from glora.types import ClientUpdate, LoRAFactors, ServerState

D, K = 24, 16
MODULES = ("layer.0.q", "layer.0.v")


def rand_factors(
    r: int, *, gen: torch.Generator, d: int = D, k: int = K, dtype: torch.dtype = torch.float64
) -> LoRAFactors:
    """Random folded factors: ``A`` (r×k), ``B`` (d×r), standard normal."""
    A = torch.randn(r, k, generator=gen, dtype=torch.float64).to(dtype)
    B = torch.randn(d, r, generator=gen, dtype=torch.float64).to(dtype)
    return LoRAFactors(A=A, B=B)


def make_updates(
    ranks: Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    modules: Sequence[str] = MODULES,
    d: int = D,
    k: int = K,
    shared_A: dict[str, Tensor] | None = None,
    shared_B: dict[str, Tensor] | None = None,
) -> list[ClientUpdate]:
    """One update per rank, random factors and weights; ``shared_A``/``shared_B`` (module →
    full-rank factor) replace every client's ``A`` (first ``r_i`` rows) or ``B`` (first columns)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        factors = {}
        for m in modules:
            f = rand_factors(r, gen=gen, d=d, k=k, dtype=dtype)
            A = shared_A[m][:r].to(dtype) if shared_A is not None else f.A
            B = shared_B[m][:, :r].to(dtype) if shared_B is not None else f.B
            factors[m] = LoRAFactors(A=A, B=B)
        w = float(torch.randint(1, 50, (1,), generator=gen))
        out.append(ClientUpdate(f"c{i}", w, factors))
    return out


def weights(updates: Sequence[ClientUpdate]) -> list[float]:
    total = sum(u.weight for u in updates)
    return [u.weight / total for u in updates]


def oracle(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """Dense ``ΔW* = Σ p_i B̃_i A_i`` (d×k) per module, in float64."""
    p = weights(updates)
    out: dict[str, Tensor] = {}
    for m in updates[0].factors:
        out[m] = sum(
            p[i] * (u.factors[m].B.double() @ u.factors[m].A.double())
            for i, u in enumerate(updates)
        )
    return out


def dense(factors: dict[str, LoRAFactors]) -> dict[str, Tensor]:
    """``B @ A`` per module, in float64."""
    return {m: f.B.double() @ f.A.double() for m, f in factors.items()}


def initial_adapter(
    r: int, *, seed: int = 7, dtype: torch.dtype = torch.float64, modules: Sequence[str] = MODULES
) -> dict[str, LoRAFactors]:
    """The standard initial global adapter (``A`` random, ``B = 0``) per module."""
    out = {}
    for j, m in enumerate(modules):
        A, B = fresh_factors(D, K, r, seed=seed + j, dtype=dtype)
        out[m] = LoRAFactors(A=A, B=B)
    return out


def snapshot(updates: Sequence[ClientUpdate]) -> list[Tensor]:
    """Clones of every factor, to check that inputs were not mutated."""
    return [t.clone() for u in updates for f in u.factors.values() for t in (f.A, f.B)]


def unchanged(updates: Sequence[ClientUpdate], snap: list[Tensor]) -> bool:
    now = [t for u in updates for f in u.factors.values() for t in (f.A, f.B)]
    return len(now) == len(snap) and all(torch.equal(a, b) for a, b in zip(now, snap, strict=True))


def replace_factor(
    updates: Sequence[ClientUpdate], which: str, *, seed: int = 99
) -> list[ClientUpdate]:
    """The same updates with factor ``which`` of every client replaced by random values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in updates:
        fs = {}
        for m, f in u.factors.items():
            t = getattr(f, which)
            new = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            fs[m] = LoRAFactors(A=new, B=f.B) if which == "A" else LoRAFactors(A=f.A, B=new)
        out.append(ClientUpdate(u.client_id, u.weight, fs))
    return out


def bad_update(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """``updates`` with a NaN in the last client's first ``B`` (an invalid round)."""
    last = updates[-1]
    m = next(iter(last.factors))
    B = last.factors[m].B.clone()
    B[0, 0] = float("nan")
    fs = dict(last.factors)
    fs[m] = LoRAFactors(A=last.factors[m].A, B=B)
    return [*updates[:-1], ClientUpdate(last.client_id, last.weight, fs)]


def states_equal(a: ServerState | None, b: ServerState | None) -> bool:
    """Same round, tensors and base delta (exact equality)."""
    if a is None or b is None:
        return a is b
    if a.round != b.round or a.tensors.keys() != b.tensors.keys():
        return False
    for m, named in a.tensors.items():
        if named.keys() != b.tensors[m].keys():
            return False
        if not all(torch.equal(t, b.tensors[m][n]) for n, t in named.items()):
            return False
    if a.base_delta.keys() != b.base_delta.keys():
        return False
    return all(
        torch.equal(f.A, b.base_delta[m].A) and torch.equal(f.B, b.base_delta[m].B)
        for m, f in a.base_delta.items()
    )


def assert_close(x: dict[str, Tensor], y: dict[str, Tensor], atol: float = 1e-10) -> None:
    assert x.keys() == y.keys()
    for m in x:
        torch.testing.assert_close(x[m].double(), y[m].double(), atol=atol, rtol=1e-9)
