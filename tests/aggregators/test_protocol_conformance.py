"""Every registered rule honours the same protocol (what engines rely on)."""

from __future__ import annotations

import json

import pytest
import torch

from glora import ClientPlan, ClientUpdate, LoRAFactors, ServerState, aggregators
from tests.helpers import fresh_initial, oracle, random_updates, rel, snapshot, unchanged

NAMES = aggregators.available()
SHAPES = {"enc.0.query": (24, 16), "enc.0.value": (24, 16), "enc.1.dense": (12, 20)}
# rules whose global model reproduces the exact weighted average of the clients' products
EXACT_EFFECTIVE = {"flexlora": {}, "flora": {}, "fedex": {}, "glora": {"server_rank": 64}}


def _round_from(
    agg, state: ServerState, rnd: int, ranks: list[int], seed: int
) -> list[ClientUpdate]:
    """Clients that start from the readout, follow the plan, and 'train' by a random step."""
    plan = agg.client_plan(rnd)
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i, r in enumerate(ranks):
        start = agg.readout(state, r)
        trained = {}
        for m, f in start.items():
            A, B = f.A.clone(), f.B.clone()
            if "A" in plan.train:
                A = A + 0.1 * torch.randn(A.shape, generator=gen, dtype=A.dtype)
            if "B" in plan.train:
                B = B + 0.1 * torch.randn(B.shape, generator=gen, dtype=B.dtype)
            trained[m] = LoRAFactors(A=A, B=B)
        trained = agg.prepare_upload(rnd, start, trained)
        ups.append(ClientUpdate(f"c{i}", float(10 + i), trained))
    return ups


@pytest.mark.parametrize("name", NAMES)
def test_two_round_protocol_from_initial_state(name):
    agg = aggregators.build(name)
    state = agg.init_state(fresh_initial(4, SHAPES, seed=0))
    assert state.round == 0 and state.method == name
    for rnd in (1, 2):
        plan = agg.client_plan(rnd)
        assert isinstance(plan, ClientPlan) and plan.train and plan.upload
        ups = _round_from(agg, state, rnd, [4, 4, 4], seed=rnd)
        state = agg.aggregate(ups)
        assert state.round == rnd and agg.state is state
        for r in (2, 4, 6):
            out = agg.readout(state, r)
            assert set(out) == set(SHAPES)
            for m, f in out.items():
                assert f.rank == r and (f.d, f.k) == SHAPES[m]
                assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        eff = agg.effective_update(state)
        assert set(eff) == set(SHAPES)
        assert all(torch.isfinite(f.delta()).all() for f in eff.values())


@pytest.mark.parametrize("name", NAMES)
def test_client_order_does_not_matter(name):
    ups = random_updates([3, 3, 3], SHAPES)
    a, b = aggregators.build(name), aggregators.build(name)
    ea = a.effective_update(a.aggregate(ups))
    eb = b.effective_update(b.aggregate(ups[::-1]))
    for m in ea:  # allclose: FedSA's global product is legitimately zero (no global B)
        assert torch.allclose(eb[m].delta(), ea[m].delta(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out_and_inputs_untouched(name):
    ups = random_updates([3, 3], SHAPES, dtype=torch.float32)
    before = snapshot(ups)
    agg = aggregators.build(name)
    state = agg.aggregate(ups)
    for f in list(agg.readout(state).values()) + list(agg.readout(state, 2).values()):
        assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32
    assert unchanged(ups, before)


@pytest.mark.parametrize("name", sorted(EXACT_EFFECTIVE))
def test_exact_rules_reproduce_the_weighted_average(name):
    ups = random_updates([2, 5, 3], SHAPES)
    agg = aggregators.build(
        name, **EXACT_EFFECTIVE[name], **({} if agg_mixed(name) else {"pad": True})
    )
    eff = agg.effective_update(agg.aggregate(ups))
    exact = oracle(ups)
    for m in exact:
        assert rel(eff[m].delta(), exact[m]) <= 1e-9


def agg_mixed(name: str) -> bool:
    return aggregators.get_class(name).mixed_ranks


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_flat_roundtrip(name):
    """What a checkpoint stores (flat tensors + JSON info) restores the same readouts."""
    agg = aggregators.build(name)
    state = agg.aggregate(random_updates([3, 3], SHAPES))
    info = json.loads(json.dumps(state.info))  # info must be JSON-able as it is
    back = ServerState.from_flat(state.method, state.round, state.flat_tensors(), info)
    other = aggregators.build(name)
    other.load_state(back)
    for r in (None, 2):
        a, b = agg.readout(state, r), other.readout(back, r)
        for m in a:
            assert torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B)
