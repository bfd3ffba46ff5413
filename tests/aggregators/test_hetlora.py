"""HetLoRA: zero padding to r_max with sparsity (norm) weights, and the self-pruning penalty."""

from __future__ import annotations

import math

import pytest
import torch

from glora import aggregators
from glora.aggregators.hetlora import HetLoRA, hetlora_penalty
from glora.types import ClientUpdate, LoRAFactors
from tests.helpers import (
    MIXED,
    check_protocol,
    check_registry,
    map_factors,
    random_updates,
)

F64 = torch.float64


def test_registry_and_options():
    check_registry("hetlora", HetLoRA, weighting="fedavg", prune_lambda=0.001)
    with pytest.raises(ValueError, match="weighting"):
        HetLoRA(weighting="sparsity")
    with pytest.raises(ValueError, match="prune_lambda"):
        HetLoRA(prune_lambda=-1.0)
    agg = HetLoRA(prune_lambda=0.001)
    assert agg.prune_lambda == 0.001 and agg.options()["weighting"] == "norm"


def _two_clients():
    """Client a: rank 1 on a 2×3 module; client b: rank 2 (weights 1 and 3)."""
    Aa = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64)
    Ba = torch.tensor([[1.0], [2.0]], dtype=F64)
    Ab = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    Bb = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    return [
        ClientUpdate("a", 1.0, {"m": LoRAFactors(A=Aa, B=Ba)}),
        ClientUpdate("b", 3.0, {"m": LoRAFactors(A=Ab, B=Bb)}),
    ]


def test_by_hand_norm_weights_padding_and_truncation():
    ups = _two_clients()
    agg = HetLoRA()
    state = agg.aggregate(ups)
    na = math.sqrt(float((ups[0].factors["m"].delta() ** 2).sum()))  # ‖[[1,0,2],[2,0,4]]‖ = 5
    nb = math.sqrt(float((ups[1].factors["m"].delta() ** 2).sum()))
    assert na == pytest.approx(5.0)
    wa, wb = na / (na + nb), nb / (na + nb)
    A_pad = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64)
    B_pad = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
    want_A = wa * A_pad + wb * ups[1].factors["m"].A
    want_B = wa * B_pad + wb * ups[1].factors["m"].B
    assert torch.allclose(state.tensors["m"]["A"], want_A, atol=1e-14)
    assert torch.allclose(state.tensors["m"]["B"], want_B, atol=1e-14)
    assert state.diagnostics["weights"]["a"] == pytest.approx(wa)
    one = agg.readout(state, 1)["m"]
    assert torch.equal(one.A, want_A[:1]) and torch.equal(one.B, want_B[:, :1])
    # fedavg mode: p = (1/4, 3/4)
    agg2 = HetLoRA(weighting="fedavg")
    s2 = agg2.aggregate(ups)
    assert torch.allclose(s2.tensors["m"]["A"], 0.25 * A_pad + 0.75 * ups[1].factors["m"].A)


def test_norm_weight_is_per_client_over_all_modules():
    ups = random_updates((2, 3), MIXED, scaled=True, seed=20)
    state = HetLoRA().aggregate(ups)
    nus = [math.sqrt(sum(float((f.delta() ** 2).sum()) for f in u.factors.values())) for u in ups]
    w = [x / sum(nus) for x in nus]
    for m in state.tensors:
        fs = [u.factors[m].pad(3) for u in ups]
        assert torch.allclose(state.tensors[m]["A"], w[0] * fs[0].A + w[1] * fs[1].A)
        assert torch.allclose(state.tensors[m]["B"], w[0] * fs[0].B + w[1] * fs[1].B)


def test_all_zero_norms_fall_back_to_fedavg():
    ups = random_updates((2, 2), MIXED, scaled=True, seed=21)
    zero = map_factors(ups, lambda f: LoRAFactors(A=f.A, B=torch.zeros_like(f.B)))
    state = HetLoRA().aggregate(zero)
    assert state.diagnostics["weights"]["c0"] == pytest.approx(1 / 3)


def test_fedavg_mode_is_padded_fedit():
    ups = random_updates((2, 4, 3), MIXED, scaled=True, seed=22)
    het = HetLoRA(weighting="fedavg")
    fedit = aggregators.build("fedit", pad=True)
    sh, sf = het.aggregate(ups), fedit.aggregate(ups)
    for m in sh.tensors:
        assert torch.allclose(sh.tensors[m]["A"], sf.tensors[m]["A"], atol=1e-14)
        assert torch.allclose(sh.tensors[m]["B"], sf.tensors[m]["B"], atol=1e-14)
    for r in (2, 4, 6):
        for f in het.readout(sh, r).values():
            assert f.rank == r


def test_penalty():
    A = torch.arange(12, dtype=F64).reshape(4, 3)
    B = torch.arange(20, dtype=F64).reshape(5, 4)
    got = hetlora_penalty(A, B, keep=2)
    want = torch.linalg.norm(A[2:]) * torch.linalg.norm(B[:, 2:])
    assert float(got) == pytest.approx(float(want))
    assert float(hetlora_penalty(A, B, keep=4)) == 0.0
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    hetlora_penalty(Ag, Bg, 1).backward()
    assert torch.count_nonzero(Ag.grad[:1]) == 0 and Ag.grad[1:].abs().sum() > 0
    with pytest.raises(ValueError, match="keep"):
        hetlora_penalty(A, B, keep=-1)


def test_common_protocol():
    check_protocol(HetLoRA)
