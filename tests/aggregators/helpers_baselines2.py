"""Fixtures and protocol checks for the FlexLoRA/HetLoRA/LoRA-FAIR/FedRot/FLoRA-NA tests.

Everything is tiny (d=24, k=16 by default, d ≠ k) and float64 unless a test says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from glora import aggregators
from glora.aggregators.base import Aggregator
from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors, UnsupportedRanks

F64 = torch.float64
MODULES = ("layer.0.q", "layer.1.v")
SHAPES = {"layer.0.q": (24, 16), "layer.1.v": (20, 12)}


def rand_factors(d: int, k: int, r: int, gen: torch.Generator, dtype=F64) -> LoRAFactors:
    """Random folded factors ``A`` (r×k), ``B`` (d×r) with O(1/√k) entries."""
    A = torch.randn(r, k, generator=gen, dtype=F64) / math.sqrt(k)
    B = torch.randn(d, r, generator=gen, dtype=F64) / math.sqrt(r)
    return LoRAFactors(A=A.to(dtype), B=B.to(dtype))


def make_updates(
    ranks: Sequence[int] = (4, 4, 4),
    *,
    seed: int = 0,
    dtype: torch.dtype = F64,
    shapes: dict[str, tuple[int, int]] | None = None,
    weights: Sequence[float] | None = None,
) -> list[ClientUpdate]:
    """One update per entry of ``ranks``: random factors per module, weights 1, 2, 3, …"""
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    out = []
    for i, r in enumerate(ranks):
        facs = {m: rand_factors(d, k, r, gen, dtype) for m, (d, k) in shapes.items()}
        w = float(i + 1) if weights is None else float(weights[i])
        out.append(ClientUpdate(client_id=f"c{i}", weight=w, factors=facs))
    return out


def weights_of(updates: Sequence[ClientUpdate]) -> Tensor:
    w = torch.tensor([u.weight for u in updates], dtype=F64)
    return w / w.sum()


def dense_oracle(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """``ΔW* = Σ p_i B̃_i A_i`` per module (float64, dense)."""
    p = weights_of(updates)
    out = {}
    for m in updates[0].factors:
        out[m] = sum(
            p[i] * (u.factors[m].B.to(F64) @ u.factors[m].A.to(F64)) for i, u in enumerate(updates)
        )
    return out


def products(adapter: dict[str, LoRAFactors]) -> dict[str, Tensor]:
    return {m: f.B.to(F64) @ f.A.to(F64) for m, f in adapter.items()}


def rel(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖_F / max(‖b‖_F, tiny)``."""
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(b)), 1e-300))


def truncated_svd(W: Tensor, r: int) -> Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def random_gauge(r: int, gen: torch.Generator) -> Tensor:
    """A well-conditioned random invertible ``r×r`` matrix (float64)."""
    Q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    s = torch.exp(torch.rand(r, generator=gen, dtype=F64) * 2 - 1)
    return (Q1 * s) @ Q2


def gauged(updates: Sequence[ClientUpdate], seed: int = 99) -> list[ClientUpdate]:
    """The updates with ``B̃_i G_i``, ``G_i⁻¹ A_i`` (a random invertible ``G_i`` per module)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in updates:
        facs = {}
        for m, f in u.factors.items():
            G = random_gauge(f.rank, gen)
            facs[m] = LoRAFactors(A=torch.linalg.solve(G, f.A), B=f.B @ G)
        out.append(ClientUpdate(u.client_id, u.weight, facs))
    return out


def snapshot(updates: Sequence[ClientUpdate]) -> list[dict[str, tuple[Tensor, Tensor]]]:
    return [{m: (f.A.clone(), f.B.clone()) for m, f in u.factors.items()} for u in updates]


def fresh_initial(shapes: dict[str, tuple[int, int]], r: int, dtype=F64) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(123)
    return {
        m: LoRAFactors(
            A=(torch.randn(r, k, generator=gen, dtype=F64) / math.sqrt(k)).to(dtype),
            B=torch.zeros(d, r, dtype=dtype),
        )
        for m, (d, k) in shapes.items()
    }


# ---------------------------------------------------------------------- protocol checks
def check_registry(name: str, cls: type[Aggregator], **opts: object) -> None:
    agg = aggregators.build(name, **opts)
    assert isinstance(agg, cls)
    assert agg.name == name
    assert name in aggregators.available()
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build(name, not_an_option=1)


def check_order_invariance(agg_a: Aggregator, agg_b: Aggregator, tol: float = 1e-10) -> None:
    ups = make_updates((4, 4, 4), seed=1)
    sa = agg_a.aggregate(ups)
    sb = agg_b.aggregate(list(reversed(ups)))
    for r in (None, 2, 4):
        pa, pb = products(agg_a.readout(sa, r)), products(agg_b.readout(sb, r))
        for m in pa:
            assert rel(pa[m], pb[m]) <= tol, (m, r)


def check_one_client(agg: Aggregator, rank: int = 4, tol: float = 1e-10) -> None:
    ups = make_updates((rank,), seed=2)
    st = agg.aggregate(ups)
    got = products(agg.readout(st))
    got_r = products(agg.readout(st, rank))
    for m, f in ups[0].factors.items():
        want = f.B @ f.A
        assert rel(got[m], want) <= tol
        assert rel(got_r[m], want) <= tol


def check_float32(agg: Aggregator) -> None:
    ups = make_updates((4, 4), seed=3, dtype=torch.float32)
    st = agg.aggregate(ups)
    for r in (None, 2, 6):
        for f in agg.readout(st, r).values():
            assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32
    ref = type(agg)(**agg.options())
    want = products(ref.readout(ref.aggregate(make_updates((4, 4), seed=3, dtype=F64))))
    got = products(agg.readout(st))
    assert set(got) == set(want)
    for m in want:  # float32 arithmetic agrees with the float64 run to float32 accuracy
        assert rel(got[m], want[m]) <= 1e-4


def check_no_mutation(agg: Aggregator) -> None:
    ups = make_updates((4, 4, 4), seed=4)
    before = snapshot(ups)
    agg.aggregate(ups)
    for u, snap in zip(ups, before, strict=True):
        for m, (A, B) in snap.items():
            assert torch.equal(u.factors[m].A, A) and torch.equal(u.factors[m].B, B)


def check_invalid_keeps_state(agg: Aggregator) -> None:
    ups = make_updates((4, 4), seed=5)
    st = agg.aggregate(ups)
    bad = make_updates((4, 4), seed=6)
    f = bad[1].factors["layer.0.q"]
    A = f.A.clone()
    A[0, 0] = float("nan")
    bad[1] = ClientUpdate("c1", 1.0, {**bad[1].factors, "layer.0.q": LoRAFactors(A=A, B=f.B)})
    with pytest.raises(InvalidUpdate, match="c1"):
        agg.aggregate(bad)
    assert agg.state is st
    assert st.round == 1
    wrong_shape = make_updates((4, 4), seed=7, shapes={"layer.0.q": (24, 16), "layer.1.v": (5, 5)})
    with pytest.raises(InvalidUpdate):
        agg.aggregate(wrong_shape)
    assert agg.state is st


def check_same_rank_only(name: str, **opts: object) -> Aggregator:
    """Mixed ranks raise UnsupportedRanks without pad; with pad=True the round runs at r_max."""
    ups = make_updates((2, 4, 3), seed=8)
    agg = aggregators.build(name, **opts)
    with pytest.raises(UnsupportedRanks, match="pad=True"):
        agg.aggregate(ups)
    assert agg.state is None
    agg = aggregators.build(name, pad=True, **opts)
    st = agg.aggregate(ups)
    for m, f in agg.readout(st).items():
        assert f.rank == 4
        assert f.d == SHAPES[m][0] and f.k == SHAPES[m][1]
    for f in agg.readout(st, 2).values():
        assert f.rank == 2
    return agg
