"""FedIT: factor averaging, its cross terms, and zero padding."""

from __future__ import annotations

import pytest
import torch

from glora import UnsupportedRanks, aggregators
from tests.helpers import oracle, random_updates, rel, weights_of


def test_fedit_is_factor_average_with_cross_terms():
    ups = random_updates([4, 4, 4])
    agg = aggregators.build("fedit")
    out = agg.readout(agg.aggregate(ups))
    p = weights_of(ups)
    for m, f in out.items():
        A = sum(p[i] * u.factors[m].A for i, u in enumerate(ups))
        B = sum(p[i] * u.factors[m].B for i, u in enumerate(ups))
        assert torch.allclose(f.A, A) and torch.allclose(f.B, B)
    exact = oracle(ups)
    assert max(rel(out[m].delta(), exact[m]) for m in exact) > 0.1  # not exact


def test_fedit_one_client_and_order():
    ups = random_updates([3])
    agg = aggregators.build("fedit")
    out = agg.readout(agg.aggregate(ups))
    assert all(torch.equal(out[m].A, ups[0].factors[m].A) for m in out)
    many = random_updates([3, 3, 3])
    a = aggregators.build("fedit")
    b = aggregators.build("fedit")
    ra, rb = a.readout(a.aggregate(many)), b.readout(b.aggregate(many[::-1]))
    assert all(torch.allclose(ra[m].B, rb[m].B) for m in ra)


def test_fedit_mixed_ranks_need_padding():
    ups = random_updates([2, 4])
    with pytest.raises(UnsupportedRanks, match="pad=True"):
        aggregators.build("fedit").aggregate(ups)
    agg = aggregators.build("fedit", pad=True)
    state = agg.aggregate(ups)
    assert agg.readout(state)["layer.0.q"].rank == 4
    assert agg.readout(state, 2)["layer.0.q"].rank == 2
