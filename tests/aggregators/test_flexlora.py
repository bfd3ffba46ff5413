"""FlexLoRA: truncated SVD of the dense weighted average."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators.flexlora import FlexLoRA
from glora.types import ClientUpdate
from tests.helpers import (
    MIXED,
    check_protocol,
    check_registry,
    gauge,
    oracle,
    products,
    random_updates,
    rel,
    truncated_svd,
)


def test_registry_and_options():
    check_registry("flexlora", FlexLoRA, split="sqrt")
    with pytest.raises(ValueError, match="split"):
        FlexLoRA(split="both")
    assert FlexLoRA().split == "B"


@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_readout_is_truncated_svd_and_full_is_exact(split):
    ups = random_updates((3, 5, 4), MIXED, scaled=True, seed=10)
    agg = FlexLoRA(split=split)
    st_ = agg.aggregate(ups)
    dense = oracle(ups)
    for m, named in st_.tensors.items():
        d, k = MIXED[m]
        q = min(12, d, k)
        assert (
            named["U"].shape == (d, q) and named["S"].shape == (q,) and named["V"].shape == (k, q)
        )
    full = products(agg.readout(st_))
    for m in dense:
        assert rel(full[m], dense[m]) <= 1e-10
    for r in (1, 3, 5):
        out = agg.readout(st_, r)
        for m, f in out.items():
            assert f.rank == r
            assert rel(f.B @ f.A, truncated_svd(dense[m], r)) <= 1e-10


def test_split_conventions():
    ups = random_updates((4, 4), MIXED, scaled=True, seed=11)
    a_b, a_s = FlexLoRA(split="B"), FlexLoRA(split="sqrt")
    fb = a_b.readout(a_b.aggregate(ups), 3)["layer.0.q"]
    fs = a_s.readout(a_s.aggregate(ups), 3)["layer.0.q"]
    # "B": A has orthonormal rows, all of Σ in B; "sqrt": balanced norms per component
    assert torch.allclose(fb.A @ fb.A.mT, torch.eye(3, dtype=fb.A.dtype), atol=1e-12)
    assert torch.allclose(fs.B.norm(dim=0), fs.A.norm(dim=1), atol=1e-12)
    assert rel(fb.B @ fb.A, fs.B @ fs.A) <= 1e-12


def test_gauge_invariance():
    ups = random_updates((3, 4, 5), MIXED, scaled=True, seed=12)
    agg1, agg2 = FlexLoRA(), FlexLoRA()
    s1, s2 = agg1.aggregate(ups), agg2.aggregate(gauge(ups, seed=99, conditioned=True))
    for r in (None, 2, 4):
        p1, p2 = products(agg1.readout(s1, r)), products(agg2.readout(s2, r))
        for m in p1:
            assert rel(p2[m], p1[m]) <= 1e-10


def test_zero_singular_values_are_refilled():
    ups = random_updates((1, 1), MIXED, scaled=True, seed=13)  # rank-2 average: q = 2
    agg = FlexLoRA()
    state = agg.aggregate(ups)
    assert state.tensors["layer.0.q"]["S"].shape == (2,)
    out = agg.readout(state, 5)
    dense = oracle(ups)
    for m, f in out.items():
        assert f.rank == 5
        assert torch.count_nonzero(f.B[:, 2:]) == 0
        assert torch.all(f.A[2:].norm(dim=1) > 0)  # fresh, trainable rows
        assert rel(f.B @ f.A, dense[m]) <= 1e-10
    # an exactly rank-deficient average: identical clients with opposite sign cancel
    u0 = random_updates((2,), MIXED, scaled=True, seed=14)[0]
    neg = {m: type(f)(A=f.A, B=-f.B) for m, f in u0.factors.items()}
    st2 = agg.aggregate([u0, ClientUpdate("c1", 1.0, neg)])
    for f in agg.readout(st2, 3).values():
        assert f.rank == 3 and torch.count_nonzero(f.B) == 0 and f.A.norm() > 0


def test_common_protocol():
    check_protocol(FlexLoRA)


def test_mixed_ranks_native_and_nested_readout():
    ups = random_updates((2, 6, 3), MIXED, scaled=True, seed=15)
    agg = aggregators.build("flexlora")
    state = agg.aggregate(ups)
    r2, r6 = agg.readout(state, 2), agg.readout(state, 6)
    for m in r2:
        assert torch.allclose(r6[m].A[:2], r2[m].A) and torch.allclose(r6[m].B[:, :2], r2[m].B)


@settings(max_examples=12, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    d=st.integers(3, 10),
    k=st.integers(3, 10),
    r=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_property_truncated_svd(ranks, d, k, r, seed):
    ups = random_updates(ranks, {"m": (d, k)}, seed=seed, scaled=True)
    agg = FlexLoRA()
    state = agg.aggregate(ups)
    dense = oracle(ups)["m"]
    f = agg.readout(state, r)["m"]
    assert f.rank == r
    assert rel(f.B @ f.A, truncated_svd(dense, min(r, sum(ranks)))) <= 1e-9
    full = agg.readout(state)["m"]
    assert rel(full.B @ full.A, dense) <= 1e-9
