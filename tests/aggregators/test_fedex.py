"""FedEx-LoRA: FedAvg factors plus an exact factored residual in the base (methods.md §6.5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators import fedex, flora
from glora.aggregators.fedex import FedExLoRA
from glora.types import ClientPlan, UnsupportedRanks
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
    weights_of,
)


def test_registry_options_plan_and_shared_helper():
    assert isinstance(aggregators.build("fedex"), FedExLoRA)
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("fedex", server_rank=2)
    assert aggregators.build("fedex").client_plan(1) == ClientPlan()
    assert fedex.base_delta_state is flora.base_delta_state  # one shared helper


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), r=st.integers(1, 5), seed=st.integers(0, 999))
def test_exact_and_adapter_is_fedavg(n, r, seed):
    ups = random_updates([r] * n, TWIN, weights="random", seed=seed)
    agg = aggregators.build("fedex")
    state = agg.aggregate(ups)
    assert_close(products(agg.effective_update(state)), oracle(ups), atol=1e-9)
    p = weights_of(ups)
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
    agg.init_state(fresh_initial(4, TWIN))
    ups1 = random_updates([4, 4, 4], TWIN, weights="random")
    s1 = agg.aggregate(ups1)
    base1 = {m: f.delta() for m, f in s1.base_delta.items()}
    ups2 = random_updates([4, 4, 4], TWIN, weights="random", seed=1)
    s2 = agg.aggregate(ups2)
    o2 = oracle(ups2)
    assert_close(products(agg.effective_update(s2)), {m: base1[m] + o2[m] for m in o2}, atol=1e-9)
    per = 2 * 4 * 4 * (D + K) * 8  # 2 modules, (n+1) r = 16 components, float64
    assert s2.info["base_delta_increments"] == {"1": per, "2": per}
    assert s1.info["base_delta_increments"] == {"1": per}


def test_recompression_past_min_dk():
    ups = random_updates([5] * 4, TWIN, weights="random", seed=3)  # (n+1) r = 25 > 16
    agg = aggregators.build("fedex")
    state = agg.aggregate(ups)
    assert all(f.rank <= min(D, K) for f in state.base_delta.values())
    assert_close(products(agg.effective_update(state)), oracle(ups), atol=1e-9)
    assert state.info["base_delta_increments"]["1"] == 2 * 25 * (D + K) * 8


def test_mixed_ranks_need_pad():
    ups = random_updates([2, 4], TWIN, weights="random")
    with pytest.raises(UnsupportedRanks):
        aggregators.build("fedex").aggregate(ups)
    agg = aggregators.build("fedex", pad=True)
    state = agg.aggregate(ups)
    assert_close(products(agg.effective_update(state)), oracle(ups), atol=1e-9)
    assert agg.readout(state)["layer.0.q"].rank == 4
    assert agg.readout(state, 2)["layer.0.q"].rank == 2


def test_order_one_client_dtype_and_no_mutation():
    ups = random_updates([3, 3, 3], TWIN, weights="random")
    check_reversed_order_same_effective("fedex", ups, atol=1e-9)
    one = random_updates([3], TWIN, weights="random")
    agg = aggregators.build("fedex")
    s = agg.aggregate(one)
    for m, named in s.tensors.items():
        torch.testing.assert_close(named["A"], one[0].factors[m].A)
        torch.testing.assert_close(named["B"], one[0].factors[m].B)
        assert float(s.base_delta[m].delta().abs().max()) < 1e-12  # zero residual
    agg32 = aggregators.build("fedex")
    agg32.aggregate(random_updates([3, 3], TWIN, weights="random", dtype=torch.float32))
    recompress = random_updates([3] * 5, TWIN, weights="random", dtype=torch.float32, seed=4)
    s32 = agg32.aggregate(recompress)
    assert all(f.A.dtype == f.B.dtype == torch.float32 for f in s32.base_delta.values())
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_invalid_update_leaves_state():
    check_invalid_round_keeps_state("fedex", [3, 3])
