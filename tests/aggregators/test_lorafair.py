"""LoRA-FAIR: FedIT plus a server-side correction of B (cosine solver and our ridge variant)."""

from __future__ import annotations

import pytest
import torch

from glora import aggregators
from glora.aggregators.lorafair import LoRAFAIR
from glora.types import LoRAFactors
from tests.helpers import (
    MIXED,
    check_float32,
    check_invalid_keeps_state,
    check_no_mutation,
    check_one_client,
    check_order_invariance,
    check_registry,
    check_same_rank_only,
    map_factors,
    oracle,
    products,
    random_updates,
    rel,
)

F64 = torch.float64


def _cos(X: torch.Tensor, Y: torch.Tensor) -> float:
    return float((X * Y).sum() / (X.norm() * Y.norm()))


def test_registry_and_options():
    check_registry("lorafair", LoRAFAIR, solver="ridge", lam=0.1)
    for bad in ({"solver": "sgd"}, {"lam": -1.0}, {"steps": -1}, {"lr": 0.0}, {"steps": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRAFAIR(**bad)


def test_cosine_improves_on_fedit():
    ups = random_updates((4, 4, 4), MIXED, scaled=True, seed=30)
    dense = oracle(ups)
    fedit = aggregators.build("fedit")
    pf = products(fedit.readout(fedit.aggregate(ups)))
    agg = LoRAFAIR(steps=100)
    state = agg.aggregate(ups)
    out = agg.readout(state)
    fed_out = fedit.readout(fedit.state)
    for m in dense:
        c_fedit, c_fair = _cos(pf[m], dense[m]), _cos(out[m].B @ out[m].A, dense[m])
        assert c_fair >= c_fedit - 1e-12
        assert c_fair > c_fedit + 1e-3  # a real improvement on random clients
        assert state.diagnostics["cosine_before"][m] == pytest.approx(c_fedit, abs=1e-10)
        assert state.diagnostics["cosine_after"][m] == pytest.approx(c_fair, abs=1e-10)
        assert torch.allclose(out[m].A, fed_out[m].A)  # only B is corrected


def test_ridge_matches_closed_form():
    ups = random_updates((3, 3), MIXED, scaled=True, seed=31)
    lam = 0.05
    agg = LoRAFAIR(solver="ridge", lam=lam)
    out = agg.readout(agg.aggregate(ups))
    dense = oracle(ups)
    p = torch.tensor([1.0, 2.0], dtype=F64) / 3
    for m, W in dense.items():
        A = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        B = sum(p[i] * u.factors[m].B for i, u in enumerate(ups))
        dB = (W - B @ A) @ A.mT @ torch.linalg.inv(A @ A.mT + lam * torch.eye(3, dtype=F64))
        assert rel(out[m].B, B + dB) <= 1e-10
        assert rel(out[m].A, A) <= 1e-14
    # lam = 0: the least-squares optimum over B
    agg0 = LoRAFAIR(solver="ridge", lam=0.0)
    out0 = agg0.readout(agg0.aggregate(ups))
    for m, W in dense.items():
        A = out0[m].A
        B_ls = W @ torch.linalg.pinv(A)
        assert rel(out0[m].B, B_ls) <= 1e-9


def test_cosine_solver_is_scale_free_and_steps_zero_is_fedit():
    ups = random_updates((3, 3), MIXED, scaled=True, seed=32)
    big = map_factors(ups, lambda f: LoRAFactors(A=f.A, B=f.B * 1000.0))
    a1, a2 = LoRAFAIR(lam=0.0, steps=60), LoRAFAIR(lam=0.0, steps=60)
    o1, o2 = a1.readout(a1.aggregate(ups)), a2.readout(a2.aggregate(big))
    for m in o1:
        assert rel(o2[m].B, 1000.0 * o1[m].B) <= 1e-6
    a0 = LoRAFAIR(steps=0)
    fedit = aggregators.build("fedit")
    s0, sf = a0.aggregate(ups), fedit.aggregate(ups)
    for m in s0.tensors:
        assert torch.allclose(s0.tensors[m]["B"], sf.tensors[m]["B"], atol=1e-14)


def test_zero_b_keeps_fedit():
    ups = random_updates((2, 2), MIXED, scaled=True, seed=33)
    zero = map_factors(ups, lambda f: LoRAFactors(A=f.A, B=torch.zeros_like(f.B)))
    state = LoRAFAIR().aggregate(zero)
    assert all(torch.count_nonzero(t["B"]) == 0 for t in state.tensors.values())


def test_no_grad_context():
    ups = random_updates((3, 3), MIXED, scaled=True, seed=34)
    with torch.no_grad():
        state = LoRAFAIR(steps=20).aggregate(ups)
    ref = LoRAFAIR(steps=20).aggregate(ups)
    for m in state.tensors:
        assert torch.allclose(state.tensors[m]["B"], ref.tensors[m]["B"])
        assert not state.tensors[m]["B"].requires_grad


def test_common_protocol():
    check_order_invariance(LoRAFAIR(steps=50), LoRAFAIR(steps=50), tol=1e-8)
    check_order_invariance(LoRAFAIR(solver="ridge"), LoRAFAIR(solver="ridge"))
    check_one_client(LoRAFAIR(steps=20))
    check_one_client(LoRAFAIR(solver="ridge", lam=0.0), tol=1e-8)
    check_float32(LoRAFAIR(steps=20))
    check_no_mutation(LoRAFAIR(steps=20))
    check_invalid_keeps_state(LoRAFAIR(steps=20))
    check_same_rank_only("lorafair", steps=20)
