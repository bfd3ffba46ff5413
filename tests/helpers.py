"""Shared test helpers: random client updates, the dense oracle Σ p_i B_i A_i, gauges, snapshots
and the protocol checks every aggregator test runs.

Everything is small (non-square layers, d ≠ k) and float64 unless a test says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import pytest
import torch
from torch import Tensor

from glora import ClientUpdate, LoRAFactors, aggregators
from glora.aggregators.base import Aggregator
from glora.linalg import fresh_factors
from glora.types import InvalidUpdate, ServerState, UnsupportedRanks

F64 = torch.float64
D, K = 24, 16
# the default of ``random_updates``: three modules, two of the same shape
SHAPES = {"layer.0.q": (24, 16), "layer.0.v": (24, 16), "layer.1.out": (12, 20)}
# two modules of the same shape (the FFA/FedSA/FLoRA/FedEx/RoLoRA tests)
TWIN = {"layer.0.q": (D, K), "layer.0.v": (D, K)}
# two modules of different shapes (the FlexLoRA/HetLoRA/LoRA-FAIR/FedRot/FLoRA-NA tests)
MIXED = {"layer.0.q": (24, 16), "layer.1.v": (20, 12)}


# ---------------------------------------------------------------------- building updates
def random_factors(
    d: int, k: int, r: int, gen: torch.Generator, *, dtype: torch.dtype = F64, scaled: bool = False
) -> LoRAFactors:
    """Random folded factors ``A`` (r×k), ``B`` (d×r), drawn in float64 (``A`` first).

    Standard normal entries, or with ``scaled`` O(1/√k) in ``A`` and O(1/√r) in ``B``.
    """
    A = torch.randn(r, k, generator=gen, dtype=F64)
    B = torch.randn(d, r, generator=gen, dtype=F64)
    if scaled:
        A, B = A / math.sqrt(k), B / math.sqrt(r)
    return LoRAFactors(A=A.to(dtype), B=B.to(dtype))


def random_updates(
    ranks: Sequence[int],
    shapes: dict[str, tuple[int, int]] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    weights: Sequence[float] | Literal["random"] | None = None,
    scaled: bool = False,
    shared_A: dict[str, Tensor] | None = None,
    shared_B: dict[str, Tensor] | None = None,
) -> list[ClientUpdate]:
    """One client per rank with random factors on every module (default: ``SHAPES``).

    ``weights``: explicit per-client weights, ``"random"`` (an integer in [1, 50) drawn after
    each client's factors) or, by default, 1, 2, 3, …; ``scaled``: see ``random_factors``.
    ``shared_A``/``shared_B`` (module → full-rank factor) replace every client's ``A`` (first
    ``r_i`` rows) or ``B`` (first ``r_i`` columns); the random ones are still drawn.
    """
    shapes = shapes or SHAPES
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        fs = {}
        for m, (d, k) in shapes.items():
            f = random_factors(d, k, r, gen, dtype=dtype, scaled=scaled)
            A = shared_A[m][:r].to(dtype) if shared_A is not None else f.A
            B = shared_B[m][:, :r].to(dtype) if shared_B is not None else f.B
            fs[m] = LoRAFactors(A=A, B=B)
        if weights is None:
            w = float(i + 1)
        elif weights == "random":
            w = float(torch.randint(1, 50, (1,), generator=gen))
        else:
            w = float(weights[i])
        out.append(ClientUpdate(f"c{i}", w, fs))
    return out


def fresh_initial(
    rank: int, shapes: dict[str, tuple[int, int]], *, seed: int = 7, dtype: torch.dtype = F64
) -> dict[str, LoRAFactors]:
    """The standard initial global adapter (``A`` random, ``B = 0``); module j uses seed + j."""
    out = {}
    for j, (m, (d, k)) in enumerate(shapes.items()):
        A, B = fresh_factors(d, k, rank, seed=seed + j, dtype=dtype)
        out[m] = LoRAFactors(A=A, B=B)
    return out


def map_factors(
    updates: Sequence[ClientUpdate], fn: Callable[[LoRAFactors], LoRAFactors]
) -> list[ClientUpdate]:
    """The same clients (id, weight) with ``fn`` applied to every module's factors, in order."""
    return [
        ClientUpdate(u.client_id, u.weight, {m: fn(f) for m, f in u.factors.items()})
        for u in updates
    ]


def gauge(
    updates: Sequence[ClientUpdate],
    *,
    seed: int = 1,
    orthogonal: bool = False,
    conditioned: bool = False,
) -> list[ClientUpdate]:
    """Apply a random per-client, per-module gauge: (B G, G⁻¹ A); products unchanged.

    ``G`` is ``X + 2I`` (X standard normal) by default, orthogonal with ``orthogonal``, or
    ``Q₁ diag(s) Q₂`` with singular values ``s ∈ [1/e, e]`` with ``conditioned``.
    """
    if orthogonal and conditioned:
        raise ValueError("orthogonal and conditioned exclude each other")
    gen = torch.Generator().manual_seed(seed)

    def one(f: LoRAFactors) -> LoRAFactors:
        if conditioned:
            G = conditioned_gauge(f.rank, gen)
        else:
            X = torch.randn(f.rank, f.rank, generator=gen, dtype=torch.float64)
            if orthogonal:
                G = torch.linalg.qr(X).Q
            else:
                G = X + 2.0 * torch.eye(f.rank, dtype=torch.float64)  # well-conditioned invertible
        G = G.to(f.dtype)
        return LoRAFactors(A=torch.linalg.solve(G, f.A), B=f.B @ G)

    return map_factors(updates, one)


def conditioned_gauge(r: int, gen: torch.Generator) -> Tensor:
    """A well-conditioned random invertible ``r×r`` matrix ``Q₁ diag(s) Q₂`` (float64)."""
    Q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    s = torch.exp(torch.rand(r, generator=gen, dtype=F64) * 2 - 1)
    return (Q1 * s) @ Q2


def replace_factor(
    updates: Sequence[ClientUpdate], which: str, *, seed: int = 99
) -> list[ClientUpdate]:
    """The same updates with factor ``which`` of every client replaced by random values."""
    gen = torch.Generator().manual_seed(seed)

    def one(f: LoRAFactors) -> LoRAFactors:
        t = getattr(f, which)
        new = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
        return LoRAFactors(A=new, B=f.B) if which == "A" else LoRAFactors(A=f.A, B=new)

    return map_factors(updates, one)


def bad_update(updates: Sequence[ClientUpdate], factor: str = "B") -> list[ClientUpdate]:
    """``updates`` with a NaN in the last client's first module's ``factor`` (an invalid round)."""
    last = updates[-1]
    m = next(iter(last.factors))
    f = last.factors[m]
    t = getattr(f, factor).clone()
    t[0, 0] = float("nan")
    new = LoRAFactors(A=t, B=f.B) if factor == "A" else LoRAFactors(A=f.A, B=t)
    return [*updates[:-1], ClientUpdate(last.client_id, last.weight, {**last.factors, m: new})]


# ---------------------------------------------------------------------- references
def weights_of(updates: Sequence[ClientUpdate]) -> Tensor:
    """The normalised client weights ``p_i`` (float64)."""
    w = torch.tensor([u.weight for u in updates], dtype=F64)
    return w / w.sum()


def oracle(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """The exact weighted average ΔW* = Σ p_i B_i A_i, dense (small layers only)."""
    total = sum(u.weight for u in updates)
    out: dict[str, Tensor] = {}
    for u in updates:
        for m, f in u.factors.items():
            term = (u.weight / total) * f.delta()
            out[m] = term if m not in out else out[m] + term
    return out


def products(
    factors: dict[str, LoRAFactors], *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """``B @ A`` per module, in the factors' dtype or, given ``dtype``, cast before multiplying."""
    if dtype is None:
        return {m: f.delta() for m, f in factors.items()}
    return {m: f.B.to(dtype) @ f.A.to(dtype) for m, f in factors.items()}


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius distance ‖a − b‖ / max(‖b‖, tiny)."""
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(b)), 1e-300))


def truncated_svd(W: Tensor, r: int) -> Tensor:
    """The best rank-``r`` approximation of ``W`` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def assert_close(x: dict[str, Tensor], y: dict[str, Tensor], atol: float = 1e-10) -> None:
    """Same modules, and per module close in float64 (``rtol = 1e-9``)."""
    assert x.keys() == y.keys()
    for m in x:
        torch.testing.assert_close(x[m].double(), y[m].double(), atol=atol, rtol=1e-9)


# ---------------------------------------------------------------------- inputs and states
def snapshot(updates: Sequence[ClientUpdate]) -> list[Tensor]:
    """Clones of every factor, to check with ``unchanged`` that inputs were not mutated."""
    return [t.clone() for u in updates for f in u.factors.values() for t in (f.A, f.B)]


def unchanged(updates: Sequence[ClientUpdate], snap: list[Tensor]) -> bool:
    now = [t for u in updates for f in u.factors.values() for t in (f.A, f.B)]
    return len(now) == len(snap) and all(torch.equal(a, b) for a, b in zip(now, snap, strict=True))


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


# ---------------------------------------------------------------------- protocol checks
# They run on ``random_updates(..., MIXED, scaled=True)`` clients.
def _updates(
    ranks: Sequence[int],
    seed: int,
    shapes: dict[str, tuple[int, int]] = MIXED,
    dtype: torch.dtype = F64,
) -> list[ClientUpdate]:
    return random_updates(ranks, shapes, seed=seed, dtype=dtype, scaled=True)


def check_registry(name: str, cls: type[Aggregator], **opts: object) -> None:
    agg = aggregators.build(name, **opts)
    assert isinstance(agg, cls)
    assert agg.name == name
    assert name in aggregators.available()
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build(name, not_an_option=1)


def check_order_invariance(agg_a: Aggregator, agg_b: Aggregator, tol: float = 1e-10) -> None:
    ups = _updates((4, 4, 4), seed=1)
    sa = agg_a.aggregate(ups)
    sb = agg_b.aggregate(list(reversed(ups)))
    for r in (None, 2, 4):
        pa, pb = products(agg_a.readout(sa, r)), products(agg_b.readout(sb, r))
        for m in pa:
            assert rel(pa[m], pb[m]) <= tol, (m, r)


def check_one_client(agg: Aggregator, rank: int = 4, tol: float = 1e-10) -> None:
    ups = _updates((rank,), seed=2)
    st = agg.aggregate(ups)
    got = products(agg.readout(st))
    got_r = products(agg.readout(st, rank))
    for m, f in ups[0].factors.items():
        want = f.B @ f.A
        assert rel(got[m], want) <= tol
        assert rel(got_r[m], want) <= tol


def check_float32(agg: Aggregator) -> None:
    ups = _updates((4, 4), seed=3, dtype=torch.float32)
    st = agg.aggregate(ups)
    for r in (None, 2, 6):
        for f in agg.readout(st, r).values():
            assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32
    ref = type(agg)(**agg.options())
    want = products(ref.readout(ref.aggregate(_updates((4, 4), seed=3))))
    got = products(agg.readout(st), dtype=F64)
    assert set(got) == set(want)
    for m in want:  # float32 arithmetic agrees with the float64 run to float32 accuracy
        assert rel(got[m], want[m]) <= 1e-4


def check_no_mutation(agg: Aggregator) -> None:
    ups = _updates((4, 4, 4), seed=4)
    before = snapshot(ups)
    agg.aggregate(ups)
    assert unchanged(ups, before)


def check_invalid_keeps_state(agg: Aggregator) -> None:
    st = agg.aggregate(_updates((4, 4), seed=5))
    with pytest.raises(InvalidUpdate, match="c1"):
        agg.aggregate(bad_update(_updates((4, 4), seed=6), "A"))
    assert agg.state is st
    assert st.round == 1
    wrong_shape = _updates((4, 4), seed=7, shapes={"layer.0.q": (24, 16), "layer.1.v": (5, 5)})
    with pytest.raises(InvalidUpdate):
        agg.aggregate(wrong_shape)
    assert agg.state is st


def check_protocol(make: Callable[[], Aggregator], order_tol: float = 1e-10) -> None:
    """The five checks above that need an aggregator, each on a fresh one from ``make``."""
    check_order_invariance(make(), make(), tol=order_tol)
    check_one_client(make())
    check_float32(make())
    check_no_mutation(make())
    check_invalid_keeps_state(make())


def check_reversed_order_same_effective(
    name: str, ups: list[ClientUpdate], atol: float = 1e-10
) -> None:
    """Two fresh ``name`` rules, clients in reverse order: same effective update, inputs intact."""
    snap = snapshot(ups)
    a, b = aggregators.build(name), aggregators.build(name)
    ea = products(a.effective_update(a.aggregate(ups)))
    eb = products(b.effective_update(b.aggregate(ups[::-1])))
    assert unchanged(ups, snap)
    assert_close(ea, eb, atol=atol)


def check_invalid_round_keeps_state(name: str, ranks: Sequence[int]) -> None:
    """A NaN round (``bad_update``) after a valid one raises and keeps the state (``TWIN``)."""
    agg = aggregators.build(name)
    s1 = agg.aggregate(random_updates(ranks, TWIN, weights="random"))
    with pytest.raises(InvalidUpdate):
        agg.aggregate(bad_update(random_updates(ranks, TWIN, seed=1, weights="random")))
    assert agg.state is s1
    assert states_equal(agg.state, s1) and s1.round == 1


def check_same_rank_only(name: str, **opts: object) -> Aggregator:
    """Mixed ranks raise UnsupportedRanks without pad; with pad=True the round runs at r_max."""
    ups = _updates((2, 4, 3), seed=8)
    agg = aggregators.build(name, **opts)
    with pytest.raises(UnsupportedRanks, match="pad=True"):
        agg.aggregate(ups)
    assert agg.state is None
    agg = aggregators.build(name, pad=True, **opts)
    st = agg.aggregate(ups)
    for m, f in agg.readout(st).items():
        assert f.rank == 4
        assert f.d == MIXED[m][0] and f.k == MIXED[m][1]
    for f in agg.readout(st, 2).values():
        assert f.rank == 2
    return agg
