"""FLoRA-NA: ALS on the mixing vectors p, q from the FedIT start."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators.florana import FLoRANA, florana_mixing
from glora.types import ClientUpdate
from tests.helpers import (
    MIXED,
    check_protocol,
    check_registry,
    check_same_rank_only,
    oracle,
    products,
    random_updates,
    rel,
    truncated_svd,
    weights_of,
)

F64 = torch.float64


def _err2(X: torch.Tensor, W: torch.Tensor) -> float:
    return float(((X - W) ** 2).sum())


def test_registry_and_options():
    check_registry("florana", FLoRANA, sweeps=5, target="sum")
    for bad in ({"sweeps": -1}, {"ridge": -1.0}, {"tol": float("nan")}, {"target": "median"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FLoRANA(**bad)


def test_objective_monotone_between_fedit_and_svd():
    ups = random_updates((4, 4, 4, 4, 4), MIXED, scaled=True, seed=50)
    dense = oracle(ups)
    w = weights_of(ups)
    agg = FLoRANA()
    state = agg.aggregate(ups)
    out = products(agg.readout(state))
    fedit = aggregators.build("fedit")
    pf = products(fedit.readout(fedit.aggregate(ups)))
    start_total = end_total = 0.0
    for m, W in dense.items():
        fs = [u.factors[m] for u in ups]
        _p, q, hist = florana_mixing([f.B for f in fs], [f.A for f in fs], w)
        assert all(b <= a + 1e-12 * hist[0] for a, b in itertools.pairwise(hist))
        f_fedit, f_end = _err2(pf[m], W), _err2(out[m], W)
        assert hist[0] == pytest.approx(f_fedit, rel=1e-10)
        assert hist[-1] == pytest.approx(f_end, rel=1e-8)  # Gram formulas match the dense value
        assert f_end < f_fedit
        assert f_end >= _err2(truncated_svd(W, 4), W) - 1e-10
        start_total += f_fedit
        end_total += f_end
        # gauge renormalisation: Σ q = Σ w
        assert float(q.sum()) == pytest.approx(1.0)
    assert state.diagnostics["objective_start"] == pytest.approx(start_total, rel=1e-10)
    assert state.diagnostics["objective_end"] == pytest.approx(end_total, rel=1e-8)


@pytest.mark.parametrize("target", ["uniform", "sum"])
def test_targets(target):
    ups = random_updates((3, 3, 3), MIXED, scaled=True, seed=51)
    n = len(ups)
    w = torch.full((n,), 1.0 / n, dtype=F64) if target == "uniform" else torch.ones(n, dtype=F64)
    agg = FLoRANA(target=target)
    out = products(agg.readout(agg.aggregate(ups)))
    for m in out:
        fs = [u.factors[m] for u in ups]
        W = sum(w[i] * (f.B @ f.A) for i, f in enumerate(fs))
        A0 = sum(w[i] * f.A for i, f in enumerate(fs))
        B0 = sum(w[i] * f.B for i, f in enumerate(fs))
        _, _, hist = florana_mixing([f.B for f in fs], [f.A for f in fs], w)
        assert hist[0] == pytest.approx(_err2(B0 @ A0, W), rel=1e-10)
        assert _err2(out[m], W) <= hist[0]


def test_sweeps_zero_is_fedit():
    ups = random_updates((4, 4, 4), MIXED, scaled=True, seed=52)
    agg = FLoRANA(sweeps=0)
    fedit = aggregators.build("fedit")
    s0, sf = agg.aggregate(ups), fedit.aggregate(ups)
    for m in s0.tensors:
        assert torch.allclose(s0.tensors[m]["A"], sf.tensors[m]["A"], atol=1e-14)
        assert torch.allclose(s0.tensors[m]["B"], sf.tensors[m]["B"], atol=1e-14)


def test_common_protocol():
    check_protocol(FLoRANA, order_tol=1e-7)
    check_same_rank_only("florana")


def test_identical_clients_are_exact():
    ups = random_updates((3,), MIXED, scaled=True, seed=53)
    twins = [ups[0], ClientUpdate("c1", 2.0, ups[0].factors)]
    agg = FLoRANA()
    out = products(agg.readout(agg.aggregate(twins)))
    for m, f in ups[0].factors.items():
        assert rel(out[m], f.B @ f.A) <= 1e-8


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 5),
    r=st.integers(1, 4),
    d=st.integers(3, 9),
    k=st.integers(3, 9),
    seed=st.integers(0, 10_000),
)
def test_property_monotone_and_bounded(n, r, d, k, seed):
    ups = random_updates([r] * n, {"m": (d, k)}, seed=seed, scaled=True)
    W = oracle(ups)["m"]
    fs = [u.factors["m"] for u in ups]
    _, _, hist = florana_mixing([f.B for f in fs], [f.A for f in fs], weights_of(ups))
    assert all(b <= a + 1e-12 * max(hist[0], 1e-30) for a, b in itertools.pairwise(hist))
    assert hist[-1] >= _err2(truncated_svd(W, r), W) - 1e-9 * max(float((W**2).sum()), 1.0)
