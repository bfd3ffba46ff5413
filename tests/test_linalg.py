"""Factored linear algebra against dense references."""

from __future__ import annotations

import torch

from glora.linalg import (
    derive_seed,
    factored_svd,
    fresh_factors,
    polar,
    procrustes,
    product_fro_norm_sq,
    weighted_product_fro_norm_sq,
)


def test_factored_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    A = torch.randn(3, 5, 13, generator=g, dtype=torch.float64)
    U, S, V = factored_svd(B, A)
    dense = B @ A
    assert torch.allclose(U * S.unsqueeze(-2) @ V.mT, dense, atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[..., :5], atol=1e-12)


def test_norms_in_factored_form():
    g = torch.Generator().manual_seed(1)
    Bs = [torch.randn(9, r, generator=g, dtype=torch.float64) for r in (2, 3)]
    As = [torch.randn(r, 7, generator=g, dtype=torch.float64) for r in (2, 3)]
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.allclose(product_fro_norm_sq(Bs[0], As[0]), (Bs[0] @ As[0]).norm() ** 2)
    dense = p[0] * Bs[0] @ As[0] + p[1] * Bs[1] @ As[1]
    assert torch.allclose(weighted_product_fro_norm_sq(Bs, As, p), dense.norm() ** 2)


def test_procrustes_recovers_rotation_with_proper_determinant():
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64)).Q
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    X = torch.randn(4, 10, generator=g, dtype=torch.float64)
    # find R maximising tr(Rᵀ M) for M = X (QᵀX)ᵀ... i.e. align Qᵀ X onto X
    R = procrustes((Q.mT @ X) @ X.mT)
    assert torch.allclose(R, Q.mT, atol=1e-10)
    assert torch.linalg.det(procrustes(torch.diag(torch.tensor([1.0, 1.0, -1.0])))) > 0
    P = polar(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert torch.allclose(P.mT @ P, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_fresh_factors_match_peft_init_bounds_and_are_nested():
    A, B = fresh_factors(6, 100, 8, seed=5)
    assert A.shape == (8, 100) and torch.count_nonzero(B) == 0
    assert float(A.abs().max()) <= 0.1
    A4, _ = fresh_factors(6, 100, 4, seed=5)
    assert torch.equal(A4, A[:4])  # same seed: a rank-4 draw is the first rows of a rank-8 one
    assert torch.equal(fresh_factors(6, 100, 8, seed=5)[0], A)


def test_derive_seed_is_stable():
    assert derive_seed(0, "glora", 1, "q") == derive_seed(0, "glora", 1, "q")
    assert derive_seed(0, "glora", 1, "q") != derive_seed(0, "glora", 2, "q")
    assert 0 <= derive_seed("x") < 2**63
