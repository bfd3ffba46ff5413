"""Client partitions and participant sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from glora.data import partition, sample_participants

LABELS = [i % 4 for i in range(2000)]  # 4 balanced labels


def _check_cover(parts: list[list[int]], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p == sorted(p) for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == n and set(flat) == set(range(n))


def _label_skew(parts: list[list[int]], labels: list[int]) -> float:
    """Mean total-variation distance between each client's label histogram and the global one."""
    k = max(labels) + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    dists = []
    for p in parts:
        h = np.bincount([labels[i] for i in p], minlength=k) / len(p)
        dists.append(0.5 * np.abs(h - glob).sum())
    return float(np.mean(dists))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_disjoint_cover_and_determinism(scheme: str) -> None:
    a = partition(LABELS, 10, scheme, alpha=0.3, seed=1)  # type: ignore[arg-type]
    _check_cover(a, len(LABELS), 10)
    assert a == partition(LABELS, 10, scheme, alpha=0.3, seed=1)  # type: ignore[arg-type]
    assert a != partition(LABELS, 10, scheme, alpha=0.3, seed=2)  # type: ignore[arg-type]
    assert min(len(p) for p in a) >= 1


def test_iid_even_sizes_and_balanced() -> None:
    parts = partition(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _label_skew(parts, LABELS) < 0.1


def test_dirichlet_small_alpha_is_skewed() -> None:
    iid = _label_skew(partition(LABELS, 10, "iid", seed=0), LABELS)
    skewed = _label_skew(partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0), LABELS)
    mild = _label_skew(partition(LABELS, 10, "dirichlet", alpha=100.0, seed=0), LABELS)
    assert skewed > 0.4 > 0.1 > mild > iid - 0.05
    assert skewed > 4 * iid


def test_dirichlet_non_integer_keys() -> None:
    keys = ["pos", "neg", "neu"] * 30
    parts = partition(keys, 5, "dirichlet", alpha=0.5, seed=3)
    _check_cover(parts, len(keys), 5)


def test_dirichlet_min_size_repair() -> None:
    # 20 examples, 10 clients, min 2 each: only the exact split works; tiny alpha almost never
    # produces it by chance, so the deterministic repair has to kick in.
    keys = [0] * 10 + [1] * 10
    parts = partition(keys, 10, "dirichlet", alpha=0.01, seed=0, min_size=2)
    _check_cover(parts, 20, 10)
    assert [len(p) for p in parts] == [2] * 10
    assert parts == partition(keys, 10, "dirichlet", alpha=0.01, seed=0, min_size=2)


def test_dirichlet_min_size_respected() -> None:
    parts = partition(LABELS, 20, "dirichlet", alpha=0.05, seed=5, min_size=30)
    _check_cover(parts, len(LABELS), 20)
    assert min(len(p) for p in parts) >= 30


def test_quantity_skew() -> None:
    parts = partition(LABELS, 10, "quantity", alpha=0.2, seed=0, min_size=5)
    _check_cover(parts, len(LABELS), 10)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 5
    assert sizes[-1] > 2 * (len(LABELS) / 10)  # one client holds a large share
    assert sizes[-1] > 10 * sizes[0]
    even = sorted(len(p) for p in partition(LABELS, 10, "quantity", alpha=1e4, seed=0))
    assert even[-1] - even[0] < 40
    # label mix stays close to the global one (no label skew)
    big = max(parts, key=len)
    counts = Counter(LABELS[i] for i in big)
    assert max(counts.values()) / len(big) < 0.35


def test_single_client_and_exact_fit() -> None:
    assert partition(LABELS[:5], 1, "dirichlet") == [[0, 1, 2, 3, 4]]
    exact = partition(LABELS[:5], 5, "quantity", alpha=0.1)
    assert sorted(i for p in exact for i in p) == list(range(5))
    assert all(len(p) == 1 for p in exact)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 11, "scheme": "iid"}, "more clients"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 2, "scheme": "quantity", "alpha": -1.0}, "alpha"),
        ({"num_clients": 2, "scheme": "pathological"}, "iid, dirichlet, quantity"),
        ({"num_clients": 4, "scheme": "iid", "min_size": 3}, "min_size"),
    ],
)
def test_partition_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(list(range(10)), **kwargs)  # type: ignore[arg-type]


def test_sample_participants() -> None:
    a = sample_participants(100, 0.1, round=3, seed=7)
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert all(0 <= i < 100 for i in a)
    assert a == sample_participants(100, 0.1, round=3, seed=7)
    assert a != sample_participants(100, 0.1, round=4, seed=7)
    assert a != sample_participants(100, 0.1, round=3, seed=8)
    assert sample_participants(10, 1.0, round=1, seed=0) == list(range(10))
    assert len(sample_participants(10, 0.01, round=1, seed=0)) == 1  # at least one
    assert len(sample_participants(10, 3, round=1, seed=0)) == 3
    assert len(sample_participants(10, 1, round=1, seed=0)) == 1  # int 1 = one client
    assert len(sample_participants(10, 0.3, round=1, seed=0)) == 3
    rounds = {tuple(sample_participants(20, 0.25, round=t, seed=0)) for t in range(1, 30)}
    assert len(rounds) > 20  # varies across rounds


@pytest.mark.parametrize("participation", [0.0, 1.5, -0.2, 0, 11, True])
def test_sample_participants_errors(participation: float) -> None:
    with pytest.raises(ValueError, match="participation"):
        sample_participants(10, participation, round=1, seed=0)
