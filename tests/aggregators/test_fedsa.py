"""FedSA-LoRA: average A only, B stays on the clients (methods.md §6.3)."""

from __future__ import annotations

import pytest
import torch

from glora import aggregators
from glora.aggregators.fedsa import FedSALoRA
from glora.types import ClientPlan, InvalidUpdate, UnsupportedRanks
from tests.aggregators.helpers_baselines1 import (
    D,
    K,
    bad_update,
    initial_adapter,
    make_updates,
    replace_factor,
    snapshot,
    states_equal,
    unchanged,
    weights,
)


def test_registry_and_options():
    assert isinstance(aggregators.build("fedsa"), FedSALoRA)
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("fedsa", server_rank=3)


def test_client_plan():
    plan = aggregators.build("fedsa").client_plan(1)
    a = frozenset({"A"})
    assert plan == ClientPlan(
        train=frozenset({"A", "B"}), upload=a, download=a, local=frozenset({"B"})
    )


def test_averages_A_and_keeps_initial_B():
    ups = make_updates([4, 4, 4])
    agg = aggregators.build("fedsa")
    init = initial_adapter(4)
    agg.init_state(init)
    state = agg.aggregate(ups)
    p = weights(ups)
    for m in state.tensors:
        A_bar = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        torch.testing.assert_close(state.tensors[m]["A"], A_bar)
        assert torch.equal(state.tensors[m]["B"], init[m].B)
        # FedSA has no global B: the global product is B_start Ā = 0
        assert float(agg.readout(state)[m].delta().abs().max()) == 0.0


def test_without_prev_B_start_is_zero():
    agg = aggregators.build("fedsa")
    state = agg.aggregate(make_updates([3, 3]))
    for named in state.tensors.values():
        assert named["B"].shape == (D, 3) and not named["B"].any()
        assert named["A"].shape == (3, K)


def test_ignores_B():
    ups = make_updates([4, 4, 4])
    a, b = aggregators.build("fedsa"), aggregators.build("fedsa")
    assert states_equal(a.aggregate(ups), b.aggregate(replace_factor(ups, "B")))


def test_order_one_client_dtype_and_no_mutation():
    ups = make_updates([3, 3, 3])
    snap = snapshot(ups)
    s1 = aggregators.build("fedsa").aggregate(ups)
    s2 = aggregators.build("fedsa").aggregate(ups[::-1])
    assert unchanged(ups, snap)
    for m in s1.tensors:
        torch.testing.assert_close(s1.tensors[m]["A"], s2.tensors[m]["A"])
    one = make_updates([3])
    s = aggregators.build("fedsa").aggregate(one)
    for m in s.tensors:
        torch.testing.assert_close(s.tensors[m]["A"], one[0].factors[m].A)
    s32 = aggregators.build("fedsa").aggregate(make_updates([3, 3], dtype=torch.float32))
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_mixed_ranks_need_pad():
    ups = make_updates([2, 4])
    with pytest.raises(UnsupportedRanks):
        aggregators.build("fedsa").aggregate(ups)
    agg = aggregators.build("fedsa", pad=True)
    agg.init_state(initial_adapter(2))
    state = agg.aggregate(ups)
    assert state.tensors["layer.0.q"]["A"].shape == (4, K)
    assert state.tensors["layer.0.q"]["B"].shape == (D, 4)
    assert agg.readout(state, 2)["layer.0.q"].rank == 2
    assert agg.readout(state, 6)["layer.0.q"].rank == 6


def test_invalid_update_leaves_state():
    agg = aggregators.build("fedsa")
    ups = make_updates([3, 3])
    agg.aggregate(ups)
    before = agg.state
    with pytest.raises(InvalidUpdate):
        agg.aggregate(bad_update(make_updates([3, 3], seed=1)))
    assert agg.state is before
