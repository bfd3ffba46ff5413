"""FLoRA: exact stacking into a cumulative base delta, native mixed ranks (methods.md §6.4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators.flora import FLoRA, accumulate_base_delta, compress_exact
from glora.types import ClientPlan, LoRAFactors, ServerState
from tests.helpers import (
    TWIN,
    D,
    K,
    assert_close,
    check_invalid_round_keeps_state,
    check_reversed_order_same_effective,
    fresh_initial,
    oracle,
    products,
    random_updates,
)


def test_registry_options_and_plan():
    assert isinstance(aggregators.build("flora"), FLoRA)
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("flora", first="A")
    assert aggregators.build("flora").client_plan(2) == ClientPlan()
    assert FLoRA.mixed_ranks


@settings(max_examples=15, deadline=None)
@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 999))
def test_exact_for_any_ranks(ranks, seed):
    ups = random_updates(ranks, TWIN, weights="random", seed=seed)
    agg = aggregators.build("flora")
    state = agg.aggregate(ups)
    assert_close(products(agg.effective_update(state)), oracle(ups))
    total = sum(ranks)
    for f in state.base_delta.values():
        assert f.rank == total if total <= min(D, K) else f.rank <= min(D, K)


def test_state_is_rank_zero_and_readout_is_fresh():
    agg = aggregators.build("flora", seed=3)
    agg.init_state(fresh_initial(4, TWIN))
    state = agg.aggregate(random_updates([2, 4], TWIN, weights="random"))
    for named in state.tensors.values():
        assert named["A"].shape == (0, K) and named["B"].shape == (D, 0)
    for r in (1, 3, 8):
        out = agg.readout(state, r)
        for f in out.values():
            assert f.rank == r and not f.B.any() and f.A.abs().sum() > 0
    # nested and deterministic per round and module
    r3, r8 = agg.readout(state, 3), agg.readout(state, 8)
    for m in r3:
        assert torch.equal(r3[m].A, r8[m].A[:3])
        assert torch.equal(r3[m].A, agg.readout(state, 3)[m].A)
    assert not torch.equal(r3["layer.0.q"].A, r3["layer.0.v"].A)


def test_two_rounds_cumulative_and_increment_bytes():
    agg = aggregators.build("flora")
    ups1 = random_updates([2, 3], TWIN, weights="random")
    ups2 = random_updates([4, 1, 1], TWIN, weights="random", seed=1)
    s1 = agg.aggregate(ups1)
    s2 = agg.aggregate(ups2)
    o1, o2 = oracle(ups1), oracle(ups2)
    assert_close(products(agg.effective_update(s2)), {m: o1[m] + o2[m] for m in o1})
    per = lambda S: 2 * S * (D + K) * 8  # two modules, float64  # noqa: E731
    assert s2.info["base_delta_increments"] == {"1": per(5), "2": per(6)}
    assert s1.info["base_delta_increments"] == {"1": per(5)}  # prev state not mutated


def test_recompression_keeps_product():
    ups = random_updates([6] * 5, TWIN, weights="random", seed=2)  # S = 30 > min(d, k) = 16
    agg = aggregators.build("flora")
    state = agg.aggregate(ups)
    for f in state.base_delta.values():
        assert f.rank <= min(D, K)
    assert_close(products(agg.effective_update(state)), oracle(ups), atol=1e-9)
    assert state.info["base_delta_increments"]["1"] == 2 * 30 * (D + K) * 8


def test_compress_exact_drops_zero_and_handles_all_zero():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(D, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, K, generator=g, dtype=torch.float64)
    f = LoRAFactors(A=torch.cat([A, A, A]), B=torch.cat([B, B, -B], dim=1))  # rank 3, 9 columns
    c = compress_exact(f)
    assert c.rank == 3
    torch.testing.assert_close(c.delta(), f.delta())
    z = compress_exact(LoRAFactors(A=torch.zeros(20, K), B=torch.zeros(D, 20)))
    assert z.rank == 0 and z.A.shape == (0, K) and z.B.shape == (D, 0)


def test_accumulate_without_prev():
    inc = {"m": LoRAFactors(A=torch.ones(2, K), B=torch.ones(D, 2))}
    base, log = accumulate_base_delta(None, inc)
    assert torch.equal(base["m"].delta(), inc["m"].delta())
    assert log == {"1": 2 * (D + K) * 4}  # one module, rank 2, float32
    prev = ServerState(method="x", round=4, base_delta=base, info={"base_delta_increments": log})
    base2, log2 = accumulate_base_delta(prev, inc)
    assert base2["m"].rank == 4 and set(log2) == {"1", "5"}


def test_order_one_client_dtype_and_no_mutation():
    ups = random_updates([2, 5, 3], TWIN, weights="random")
    check_reversed_order_same_effective("flora", ups)
    one = random_updates([3], TWIN, weights="random")
    agg = aggregators.build("flora")
    s = agg.aggregate(one)
    for m, f in s.base_delta.items():
        assert torch.equal(f.A, one[0].factors[m].A) and torch.equal(f.B, one[0].factors[m].B)
    agg32 = aggregators.build("flora")
    s32 = agg32.aggregate(random_updates([2, 3], TWIN, weights="random", dtype=torch.float32))
    recompress = random_updates([6, 6, 6], TWIN, weights="random", dtype=torch.float32, seed=4)
    s32 = agg32.aggregate(recompress)
    assert all(f.A.dtype == f.B.dtype == torch.float32 for f in s32.base_delta.values())
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_invalid_update_leaves_state():
    check_invalid_round_keeps_state("flora", [2, 3])
