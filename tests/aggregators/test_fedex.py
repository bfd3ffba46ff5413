"""FedEx-LoRA: FedAvg factors plus an exact factored residual in the base (methods.md §6.5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators import fedex, flora
from glora.aggregators.fedex import FedExLoRA
from glora.types import ClientPlan, InvalidUpdate, UnsupportedRanks
from tests.aggregators.helpers_baselines1 import (
    D,
    K,
    assert_close,
    bad_update,
    dense,
    initial_adapter,
    make_updates,
    oracle,
    snapshot,
    states_equal,
    unchanged,
    weights,
)


def test_registry_options_plan_and_shared_helper():
    assert isinstance(aggregators.build("fedex"), FedExLoRA)
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("fedex", server_rank=2)
    assert aggregators.build("fedex").client_plan(1) == ClientPlan()
    assert fedex.accumulate_base_delta is flora.accumulate_base_delta


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), r=st.integers(1, 5), seed=st.integers(0, 999))
def test_exact_and_adapter_is_fedavg(n, r, seed):
    ups = make_updates([r] * n, seed=seed)
    agg = aggregators.build("fedex")
    state = agg.aggregate(ups)
    assert_close(dense(agg.effective_update(state)), oracle(ups), atol=1e-9)
    p = weights(ups)
    for m, named in state.tensors.items():
        A_bar = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        B_bar = sum(p[i] * u.factors[m].B for i, u in enumerate(ups))
        torch.testing.assert_close(named["A"], A_bar)
        torch.testing.assert_close(named["B"], B_bar)
        n_comp = (n + 1) * r
        assert (
            state.base_delta[m].rank == n_comp
            if n_comp <= min(D, K)
            else state.base_delta[m].rank <= K
        )


def test_two_rounds_base_plus_adapter_is_second_average():
    agg = aggregators.build("fedex")
    agg.init_state(initial_adapter(4))
    ups1 = make_updates([4, 4, 4])
    s1 = agg.aggregate(ups1)
    base1 = {m: f.delta() for m, f in s1.base_delta.items()}
    ups2 = make_updates([4, 4, 4], seed=1)
    s2 = agg.aggregate(ups2)
    o2 = oracle(ups2)
    assert_close(dense(agg.effective_update(s2)), {m: base1[m] + o2[m] for m in o2}, atol=1e-9)
    per = 2 * 4 * 4 * (D + K) * 8  # 2 modules, (n+1) r = 16 components, float64
    assert s2.info["base_delta_increments"] == {"1": per, "2": per}
    assert s1.info["base_delta_increments"] == {"1": per}


def test_recompression_past_min_dk():
    ups = make_updates([5] * 4, seed=3)  # (n+1) r = 25 > 16
    agg = aggregators.build("fedex")
    state = agg.aggregate(ups)
    assert all(f.rank <= min(D, K) for f in state.base_delta.values())
    assert_close(dense(agg.effective_update(state)), oracle(ups), atol=1e-9)
    assert state.info["base_delta_increments"]["1"] == 2 * 25 * (D + K) * 8


def test_mixed_ranks_need_pad():
    ups = make_updates([2, 4])
    with pytest.raises(UnsupportedRanks):
        aggregators.build("fedex").aggregate(ups)
    agg = aggregators.build("fedex", pad=True)
    state = agg.aggregate(ups)
    assert_close(dense(agg.effective_update(state)), oracle(ups), atol=1e-9)
    assert agg.readout(state)["layer.0.q"].rank == 4
    assert agg.readout(state, 2)["layer.0.q"].rank == 2


def test_order_one_client_dtype_and_no_mutation():
    ups = make_updates([3, 3, 3])
    snap = snapshot(ups)
    a, b = aggregators.build("fedex"), aggregators.build("fedex")
    ea = dense(a.effective_update(a.aggregate(ups)))
    eb = dense(b.effective_update(b.aggregate(ups[::-1])))
    assert unchanged(ups, snap)
    assert_close(ea, eb, atol=1e-9)
    one = make_updates([3])
    agg = aggregators.build("fedex")
    s = agg.aggregate(one)
    for m, named in s.tensors.items():
        torch.testing.assert_close(named["A"], one[0].factors[m].A)
        torch.testing.assert_close(named["B"], one[0].factors[m].B)
        assert float(s.base_delta[m].delta().abs().max()) < 1e-12  # zero residual
    agg32 = aggregators.build("fedex")
    agg32.aggregate(make_updates([3, 3], dtype=torch.float32))
    s32 = agg32.aggregate(make_updates([3] * 5, dtype=torch.float32, seed=4))  # recompress
    assert all(f.A.dtype == f.B.dtype == torch.float32 for f in s32.base_delta.values())
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_invalid_update_leaves_state():
    agg = aggregators.build("fedex")
    s1 = agg.aggregate(make_updates([3, 3]))
    with pytest.raises(InvalidUpdate):
        agg.aggregate(bad_update(make_updates([3, 3], seed=1)))
    assert agg.state is s1
    assert states_equal(agg.state, s1) and s1.round == 1
