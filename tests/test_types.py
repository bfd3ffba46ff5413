"""Value types: folding, padding, truncation, server-state flattening."""

from __future__ import annotations

import pytest
import torch

from glora import ClientPlan, InvalidUpdate, LoRAFactors, ServerState, fold, lora_scale, unfold


def test_lora_scale_plain_and_rslora():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError):
        lora_scale(16, 0)


def test_fold_unfold_roundtrip_and_product():
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    f = fold(A, B, 2.5)
    assert torch.allclose(f.delta(), 2.5 * B @ A)
    A2, B2 = unfold(f, 2.5)
    assert torch.equal(A2, A) and torch.allclose(B2, B)
    with pytest.raises(ValueError):
        unfold(f, 0.0)


def test_pad_truncate_and_shapes():
    f = LoRAFactors(A=torch.randn(3, 7), B=torch.randn(5, 3))
    assert (f.rank, f.d, f.k) == (3, 5, 7)
    p = f.pad(6)
    assert p.rank == 6 and torch.allclose(p.delta(), f.delta())
    assert torch.equal(p.truncate(3).A, f.A)
    assert f.pad(3) is f
    with pytest.raises(ValueError):
        f.pad(2)
    assert f.nbytes() == (21 + 15) * 4
    assert f.nbytes(frozenset({"A"})) == 21 * 4


def test_invalid_update_message_names_client_and_module():
    e = InvalidUpdate("bad rank", client_id="c1", module="q")
    assert str(e) == "client 'c1', module 'q': bad rank"
    assert isinstance(e, ValueError)


def test_server_state_flat_roundtrip():
    s = ServerState(
        method="glora",
        round=3,
        tensors={"a.b.q": {"U_ref": torch.randn(4, 2), "C": torch.randn(2, 3)}},
        base_delta={"a.b.q": LoRAFactors(A=torch.randn(1, 3), B=torch.randn(4, 1))},
        info={"x": 1},
    )
    back = ServerState.from_flat("glora", 3, s.flat_tensors(), s.info)
    assert torch.equal(back.tensors["a.b.q"]["C"], s.tensors["a.b.q"]["C"])
    assert torch.equal(back.base_delta["a.b.q"].B, s.base_delta["a.b.q"].B)
    with pytest.raises(ValueError):
        ServerState.from_flat("glora", 0, {"weird": torch.zeros(1)})


def test_client_plan_json_roundtrip():
    plan = ClientPlan(train=frozenset({"B"}), upload=frozenset({"B"}), local=frozenset({"A"}))
    assert ClientPlan.from_json(plan.to_json()) == plan
