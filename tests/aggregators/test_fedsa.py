"""FedSA-LoRA: average A only, B stays on the clients (methods.md §6.3)."""

from __future__ import annotations

import pytest
import torch

from glora import aggregators
from glora.aggregators.fedsa import FedSALoRA
from glora.types import ClientPlan, InvalidUpdate, UnsupportedRanks
from tests.helpers import (
    TWIN,
    D,
    K,
    bad_update,
    fresh_initial,
    random_updates,
    replace_factor,
    snapshot,
    states_equal,
    unchanged,
    weights_of,
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
    ups = random_updates([4, 4, 4], TWIN, weights="random")
    agg = aggregators.build("fedsa")
    init = fresh_initial(4, TWIN)
    agg.init_state(init)
    state = agg.aggregate(ups)
    p = weights_of(ups)
    for m in state.tensors:
        A_bar = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        torch.testing.assert_close(state.tensors[m]["A"], A_bar)
        assert torch.equal(state.tensors[m]["B"], init[m].B)
        # FedSA has no global B: the global product is B_start Ā = 0
        assert float(agg.readout(state)[m].delta().abs().max()) == 0.0


def test_without_prev_B_start_is_zero():
    agg = aggregators.build("fedsa")
    state = agg.aggregate(random_updates([3, 3], TWIN, weights="random"))
    for named in state.tensors.values():
        assert named["B"].shape == (D, 3) and not named["B"].any()
        assert named["A"].shape == (3, K)


def test_ignores_B():
    ups = random_updates([4, 4, 4], TWIN, weights="random")
    a, b = aggregators.build("fedsa"), aggregators.build("fedsa")
    assert states_equal(a.aggregate(ups), b.aggregate(replace_factor(ups, "B")))


def test_order_one_client_dtype_and_no_mutation():
    ups = random_updates([3, 3, 3], TWIN, weights="random")
    snap = snapshot(ups)
    s1 = aggregators.build("fedsa").aggregate(ups)
    s2 = aggregators.build("fedsa").aggregate(ups[::-1])
    assert unchanged(ups, snap)
    for m in s1.tensors:
        torch.testing.assert_close(s1.tensors[m]["A"], s2.tensors[m]["A"])
    one = random_updates([3], TWIN, weights="random")
    s = aggregators.build("fedsa").aggregate(one)
    for m in s.tensors:
        torch.testing.assert_close(s.tensors[m]["A"], one[0].factors[m].A)
    s32 = aggregators.build("fedsa").aggregate(
        random_updates([3, 3], TWIN, weights="random", dtype=torch.float32)
    )
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_mixed_ranks_need_pad():
    ups = random_updates([2, 4], TWIN, weights="random")
    with pytest.raises(UnsupportedRanks):
        aggregators.build("fedsa").aggregate(ups)
    agg = aggregators.build("fedsa", pad=True)
    agg.init_state(fresh_initial(2, TWIN))
    state = agg.aggregate(ups)
    assert state.tensors["layer.0.q"]["A"].shape == (4, K)
    assert state.tensors["layer.0.q"]["B"].shape == (D, 4)
    assert agg.readout(state, 2)["layer.0.q"].rank == 2
    assert agg.readout(state, 6)["layer.0.q"].rank == 6


def test_invalid_update_leaves_state():
    agg = aggregators.build("fedsa")
    ups = random_updates([3, 3], TWIN, weights="random")
    agg.aggregate(ups)
    before = agg.state
    with pytest.raises(InvalidUpdate):
        agg.aggregate(bad_update(random_updates([3, 3], TWIN, weights="random", seed=1)))
    assert agg.state is before
