"""FedRot-LoRA: client-side Procrustes alignment (hard and soft) and FedIT on the server."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glora import aggregators
from glora.aggregators.fedrot import FedRotLoRA, align_factor, align_pair, alignment_rotation
from glora.types import LoRAFactors
from tests.helpers import (
    MIXED,
    check_protocol,
    check_registry,
    check_same_rank_only,
    random_factors,
    random_updates,
    rel,
)

F64 = torch.float64


def _rotation(r: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def _pair(seed: int, d: int = 24, k: int = 16, r: int = 4, noise: float = 0.1):
    """Trained factors = a rotated copy of the reference plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ref = random_factors(d, k, r, gen, scaled=True)
    Q = _rotation(r, gen)
    A = Q.mT @ ref.A + noise * torch.randn(r, k, generator=gen, dtype=F64)
    B = ref.B @ Q + noise * torch.randn(d, r, generator=gen, dtype=F64)
    return LoRAFactors(A=A, B=B), ref, Q


def test_registry_and_options():
    check_registry("fedrot", FedRotLoRA, lam=1.0, det_fix=False)
    with pytest.raises(ValueError, match="lam"):
        FedRotLoRA(lam=-0.1)
    with pytest.raises(ValueError, match="det_fix"):
        FedRotLoRA(det_fix="yes")
    with pytest.raises(ValueError, match="factor"):
        f, ref, _ = _pair(0)
        align_pair(f.B, f.A, ref.B, ref.A, "C")


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0, 2.0])
def test_alignment_keeps_product_and_moves_closer(factor, lam):
    for seed in range(3):
        f, ref, _ = _pair(seed)
        out = align_pair(f.B, f.A, ref.B, ref.A, factor, lam)
        assert rel(out.B @ out.A, f.B @ f.A) <= 1e-12
        if factor == "A":
            assert (out.A - ref.A).norm() <= (f.A - ref.A).norm() + 1e-12
        else:
            assert (out.B - ref.B).norm() <= (f.B - ref.B).norm() + 1e-12


def test_procrustes_recovers_known_rotation():
    f, ref, Q = _pair(1, noise=0.0)
    out = align_pair(f.B, f.A, ref.B, ref.A, "A", lam=1.0)
    assert torch.allclose(out.A, ref.A, atol=1e-12) and torch.allclose(out.B, ref.B, atol=1e-12)
    M = f.A @ ref.A.mT
    assert torch.allclose(alignment_rotation(M, lam=1.0), Q.mT, atol=1e-12)
    out_b = align_pair(f.B, f.A, ref.B, ref.A, "B", lam=1.0)
    assert torch.allclose(out_b.B, ref.B, atol=1e-12)


def test_det_fix_gives_proper_rotation():
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(4, 16, generator=gen, dtype=F64)
    Refl = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64))
    M = (Refl @ ref) @ ref.mT  # best orthogonal alignment is a reflection
    R_fix = alignment_rotation(M, lam=1.0, det_fix=True)
    R_raw = alignment_rotation(M, lam=1.0, det_fix=False)
    assert float(torch.linalg.det(R_fix)) == pytest.approx(1.0)
    assert float(torch.linalg.det(R_raw)) == pytest.approx(-1.0)
    for lam in (0.2, 0.7):
        R = alignment_rotation(M, lam=lam, det_fix=True)
        assert float(torch.linalg.det(R)) == pytest.approx(1.0)
        assert torch.allclose(R @ R.mT, torch.eye(4, dtype=F64), atol=1e-12)


def test_lam_zero_and_zero_reference_are_identity():
    f, ref, _ = _pair(2)
    out = align_pair(f.B, f.A, ref.B, ref.A, "A", lam=0.0)
    assert torch.equal(out.A, f.A) and torch.equal(out.B, f.B)
    zero_ref = align_pair(f.B, f.A, torch.zeros_like(ref.B), ref.A, "B", lam=1.0)
    assert torch.equal(zero_ref.B, f.B) and torch.equal(zero_ref.A, f.A)
    ups = random_updates((4, 4), MIXED, scaled=True, seed=40)
    agg = FedRotLoRA(lam=0.0)
    received = dict(random_updates((4,), MIXED, scaled=True, seed=41)[0].factors.items())
    for rnd in (1, 2, 3):
        same = agg.prepare_upload(rnd, received, ups[0].factors)
        assert all(same[m] is ups[0].factors[m] for m in same)


def test_round_schedule_and_alternation():
    assert [align_factor(t) for t in (1, 2, 3, 4, 5)] == [None, "A", "B", "A", "B"]
    with pytest.raises(ValueError, match="round"):
        align_factor(0)
    agg = FedRotLoRA(lam=0.5)
    f, ref, _ = _pair(3)
    trained, received = {"m": f}, {"m": ref}
    r1 = agg.prepare_upload(1, received, trained)
    assert r1["m"] is f
    r2 = agg.prepare_upload(2, received, trained)["m"]
    r3 = agg.prepare_upload(3, received, trained)["m"]
    want2 = align_pair(f.B, f.A, ref.B, ref.A, "A", 0.5)
    want3 = align_pair(f.B, f.A, ref.B, ref.A, "B", 0.5)
    assert torch.equal(r2.A, want2.A) and torch.equal(r2.B, want2.B)
    assert torch.equal(r3.A, want3.A) and torch.equal(r3.B, want3.B)
    assert not torch.equal(r2.A, r3.A)
    with pytest.raises(ValueError, match="reference"):
        agg.prepare_upload(2, {}, trained)


def test_server_is_fedit_and_alignment_changes_fedit_average():
    ups = random_updates((4, 4, 4), MIXED, scaled=True, seed=42)
    rot, fedit = FedRotLoRA(), aggregators.build("fedit")
    s1, s2 = rot.aggregate(ups), fedit.aggregate(ups)
    for m in s1.tensors:
        assert torch.equal(s1.tensors[m]["A"], s2.tensors[m]["A"])
        assert torch.equal(s1.tensors[m]["B"], s2.tensors[m]["B"])


def test_float32_alignment():
    f, ref, _ = _pair(4)
    out = align_pair(f.B.float(), f.A.float(), ref.B.float(), ref.A.float(), "B", 0.5)
    assert out.A.dtype == torch.float32 and out.B.dtype == torch.float32
    assert rel(out.B.double() @ out.A.double(), f.B @ f.A) <= 1e-5


def test_common_protocol():
    check_protocol(FedRotLoRA)
    check_same_rank_only("fedrot")


@settings(max_examples=15, deadline=None)
@given(
    r=st.integers(1, 6),
    d=st.integers(2, 12),
    k=st.integers(2, 12),
    lam=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
    factor=st.sampled_from(["A", "B"]),
    seed=st.integers(0, 10_000),
)
def test_property_product_unchanged(r, d, k, lam, factor, seed):
    gen = torch.Generator().manual_seed(seed)
    f, ref = random_factors(d, k, r, gen, scaled=True), random_factors(d, k, r, gen, scaled=True)
    out = align_pair(f.B, f.A, ref.B, ref.A, factor, lam)
    assert rel(out.B @ out.A, f.B @ f.A) <= 1e-12
    if lam >= 1:
        X, X_ref, Y = (f.A, ref.A, out.A) if factor == "A" else (f.B, ref.B, out.B)
        assert (Y - X_ref).norm() <= (X - X_ref).norm() + 1e-10
