"""FFA-LoRA: B-only averaging with a frozen shared A_0 (methods.md §6.2)."""

from __future__ import annotations

import pytest
import torch

from glora import aggregators
from glora.aggregators.ffa import FFALoRA
from glora.types import ClientPlan, InvalidUpdate, UnsupportedRanks
from tests.helpers import (
    TWIN,
    assert_close,
    bad_update,
    fresh_initial,
    oracle,
    products,
    random_updates,
    replace_factor,
    snapshot,
    states_equal,
    unchanged,
)


def _setup(ranks, dtype=torch.float64, seed=0):
    init = fresh_initial(max(ranks), TWIN, dtype=dtype)
    agg = aggregators.build("ffa", pad=len(set(ranks)) > 1)
    agg.init_state(init)
    ups = random_updates(
        ranks,
        TWIN,
        weights="random",
        seed=seed,
        dtype=dtype,
        shared_A={m: f.A for m, f in init.items()},
    )
    return agg, init, ups


def test_registry_and_options():
    assert isinstance(aggregators.build("ffa"), FFALoRA)
    with pytest.raises(ValueError, match="unknown option"):
        aggregators.build("ffa", first="A")


def test_client_plan():
    plan = aggregators.build("ffa").client_plan(3)
    b = frozenset({"B"})
    assert plan == ClientPlan(train=b, upload=b, download=b, local=frozenset({"A"}))


def test_exact_with_shared_A0_and_A_kept():
    agg, init, ups = _setup([4, 4, 4])
    state = agg.aggregate(ups)
    assert_close(products(agg.effective_update(state)), oracle(ups))
    for m, f in init.items():
        assert torch.equal(state.tensors[m]["A"], f.A)


def test_reads_only_B_after_init():
    agg, init, ups = _setup([4, 4])
    ref = aggregators.build("ffa")
    ref.init_state(init)
    a = agg.aggregate(ups)
    b = ref.aggregate(replace_factor(ups, "A"))
    assert states_equal(a, b)


def test_without_init_uses_average_A():
    init = fresh_initial(4, TWIN)
    ups = random_updates([4, 4], TWIN, weights="random", shared_A={m: f.A for m, f in init.items()})
    agg = aggregators.build("ffa")
    state = agg.aggregate(ups)
    assert_close(products(agg.readout(state)), oracle(ups))


def test_order_one_client_dtype_and_no_mutation():
    agg, _, ups = _setup([3, 3, 3])
    agg2, _, _ = _setup([3, 3, 3])
    snap = snapshot(ups)
    s1, s2 = agg.aggregate(ups), agg2.aggregate(ups[::-1])
    assert unchanged(ups, snap)
    for m in s1.tensors:
        torch.testing.assert_close(s1.tensors[m]["B"], s2.tensors[m]["B"])
    one, _, ups1 = _setup([3])
    out = one.readout(one.aggregate(ups1))
    for m, f in out.items():
        torch.testing.assert_close(f.B, ups1[0].factors[m].B)
        assert torch.equal(f.A, ups1[0].factors[m].A)
    a32, _, u32 = _setup([3, 3], dtype=torch.float32)
    s32 = a32.aggregate(u32)
    assert all(t.dtype == torch.float32 for named in s32.tensors.values() for t in named.values())


def test_mixed_ranks_need_pad_and_nested_A0():
    init = fresh_initial(6, TWIN)
    ups = random_updates(
        [2, 4, 6], TWIN, weights="random", shared_A={m: f.A for m, f in init.items()}
    )
    agg = aggregators.build("ffa")
    agg.init_state(init)
    with pytest.raises(UnsupportedRanks):
        agg.aggregate(ups)
    agg = aggregators.build("ffa", pad=True)
    agg.init_state(init)
    state = agg.aggregate(ups)
    assert_close(products(agg.effective_update(state)), oracle(ups))
    assert agg.readout(state, 2)["layer.0.q"].rank == 2
    assert torch.equal(agg.readout(state, 4)["layer.0.q"].A, init["layer.0.q"].A[:4])
    # a round of smaller rank keeps the full A_0 (B zero-padded)
    small = random_updates(
        [2, 2], TWIN, weights="random", shared_A={m: f.A for m, f in init.items()}
    )
    state2 = agg.aggregate(small)
    assert state2.tensors["layer.0.q"]["A"].shape == (6, 16)
    assert_close(products(agg.readout(state2)), oracle(small))


def test_rank_above_A0_is_invalid_and_state_kept():
    init = fresh_initial(4, TWIN)
    agg = aggregators.build("ffa")
    agg.init_state({m: f.truncate(2) for m, f in init.items()})
    ups = random_updates([4, 4], TWIN, weights="random", shared_A={m: f.A for m, f in init.items()})
    before = agg.state
    with pytest.raises(InvalidUpdate, match="A_0"):
        agg.aggregate(ups)
    assert agg.state is before


def test_invalid_update_leaves_state():
    agg, _, ups = _setup([4, 4])
    agg.aggregate(ups)
    before = agg.state
    with pytest.raises(InvalidUpdate, match="NaN"):
        agg.aggregate(bad_update(ups))
    assert agg.state is before and before.round == 1
