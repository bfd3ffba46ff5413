"""RoLoRA: alternating A/B training and averaging (methods.md §6.9)."""

from __future__ import annotations

import pytest
import torch

from glora import aggregators
from glora.aggregators.rolora import RoLoRA
from glora.types import ClientPlan, ClientUpdate, InvalidUpdate, LoRAFactors, UnsupportedRanks
from tests.helpers import (
    TWIN,
    assert_close,
    bad_update,
    fresh_initial,
    oracle,
    products,
    random_updates,
    snapshot,
    states_equal,
    unchanged,
    weights_of,
)


def test_registry_and_options():
    agg = aggregators.build("rolora")
    assert isinstance(agg, RoLoRA) and agg.first == "B"
    assert aggregators.build("rolora", first="A").first == "A"
    with pytest.raises(ValueError, match="first"):
        aggregators.build("rolora", first="C")
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("rolora", order="A")
    assert "first" in RoLoRA.option_names()


def test_client_plan_alternates():
    both = frozenset({"A", "B"})
    agg = aggregators.build("rolora")
    assert agg.client_plan(1) == ClientPlan(train=frozenset("B"), upload=frozenset("B"))
    assert agg.client_plan(2) == ClientPlan(train=frozenset("A"), upload=frozenset("A"))
    assert agg.client_plan(2).download == both
    agg_a = aggregators.build("rolora", first="A")
    assert agg_a.client_plan(1).train == frozenset("A")
    assert agg_a.client_plan(4).upload == frozenset("B")


def _shared(state_or_init, agg=None, factor="A"):
    """Module → the frozen factor the clients share (from a readout)."""
    fs = agg.readout(state_or_init) if agg is not None else state_or_init
    return {m: getattr(f, factor) for m, f in fs.items()}


def test_two_rounds_exact_with_shared_frozen_factor():
    agg = aggregators.build("rolora")
    init = fresh_initial(4, TWIN)
    agg.init_state(init)
    # round 1: train B, A frozen at the initial A
    ups1 = random_updates([4, 4, 4], TWIN, weights="random", shared_A=_shared(init))
    s1 = agg.aggregate(ups1)
    assert_close(products(agg.readout(s1)), oracle(ups1))
    for m in s1.tensors:
        assert torch.equal(s1.tensors[m]["A"], init[m].A)
    # round 2: train A, B frozen at the round-1 average
    ups2 = random_updates([4, 4, 4], TWIN, weights="random", seed=5, shared_B=_shared(s1, agg, "B"))
    s2 = agg.aggregate(ups2)
    assert_close(products(agg.readout(s2)), oracle(ups2))
    for m in s2.tensors:
        assert torch.equal(s2.tensors[m]["B"], s1.tensors[m]["B"])


def test_reads_only_trained_factor():
    init = fresh_initial(4, TWIN)
    a, b = aggregators.build("rolora"), aggregators.build("rolora")
    a.init_state(init)
    b.init_state(init)
    ups = random_updates([4, 4], TWIN, weights="random")
    other = random_updates(
        [4, 4], TWIN, weights="random", seed=3
    )  # round 1 trains B: the A's must not matter
    mixed = [
        ClientUpdate(
            u.client_id,
            u.weight,
            {m: LoRAFactors(A=o.factors[m].A, B=f.B) for m, f in u.factors.items()},
        )
        for u, o in zip(ups, other, strict=True)
    ]
    assert states_equal(a.aggregate(ups), b.aggregate(mixed))


def test_without_prev_uses_average_frozen():
    ups = random_updates([3, 3], TWIN, weights="random")
    state = aggregators.build("rolora").aggregate(ups)
    p = weights_of(ups)
    for m in state.tensors:
        A_bar = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        torch.testing.assert_close(state.tensors[m]["A"], A_bar)


def test_order_one_client_dtype_and_no_mutation():
    ups = random_updates([3, 3, 3], TWIN, weights="random")
    snap = snapshot(ups)
    s1 = aggregators.build("rolora").aggregate(ups)
    s2 = aggregators.build("rolora").aggregate(ups[::-1])
    assert unchanged(ups, snap)
    for m in s1.tensors:
        for n in ("A", "B"):
            torch.testing.assert_close(s1.tensors[m][n], s2.tensors[m][n])
    one = random_updates([3], TWIN, weights="random")
    s = aggregators.build("rolora").aggregate(one)
    for m in s.tensors:
        torch.testing.assert_close(s.tensors[m]["B"], one[0].factors[m].B)
        torch.testing.assert_close(s.tensors[m]["A"], one[0].factors[m].A)
    s32 = aggregators.build("rolora").aggregate(
        random_updates([3, 3], TWIN, weights="random", dtype=torch.float32)
    )
    assert all(t.dtype == torch.float32 for n in s32.tensors.values() for t in n.values())


def test_mixed_ranks_need_pad():
    init = fresh_initial(6, TWIN)
    ups = random_updates([2, 4], TWIN, weights="random", shared_A=_shared(init))
    with pytest.raises(UnsupportedRanks):
        aggregators.build("rolora").aggregate(ups)
    agg = aggregators.build("rolora", pad=True)
    agg.init_state(init)
    state = agg.aggregate(ups)
    assert state.tensors["layer.0.q"]["B"].shape[1] == 4
    assert torch.equal(state.tensors["layer.0.q"]["A"], init["layer.0.q"].A[:4])
    assert_close(products(agg.readout(state)), oracle(ups))
    assert agg.readout(state, 2)["layer.0.q"].rank == 2


def test_invalid_update_leaves_state():
    agg = aggregators.build("rolora")
    agg.init_state(fresh_initial(3, TWIN))
    before = agg.state
    with pytest.raises(InvalidUpdate):
        agg.aggregate(bad_update(random_updates([3, 3], TWIN, weights="random")))
    assert agg.state is before
    # the round counter did not advance: the next valid round still trains B
    ups = random_updates([3, 3], TWIN, weights="random", shared_A=_shared(fresh_initial(3, TWIN)))
    s = agg.aggregate(ups)
    assert s.round == 1
    assert_close(products(agg.readout(s)), oracle(ups))
