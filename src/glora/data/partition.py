"""Client partitions of a data set (IID, Dirichlet label skew, quantity skew) and sampling.

All functions are deterministic in their ``seed`` (numpy ``Generator``s seeded explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

__all__ = ["SCHEMES", "partition", "sample_participants"]

Scheme = Literal["iid", "dirichlet", "quantity"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "quantity")

_MAX_DIRICHLET_TRIES = 100


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` into consecutive chunks whose sizes follow ``proportions``."""
    cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
    return np.split(indices, cuts)


def _repair(clients: list[list[int]], min_size: int) -> None:
    """Move examples from the largest clients to those below ``min_size`` (in place)."""
    while True:
        sizes = [len(c) for c in clients]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return
        large = int(np.argmax(sizes))  # first largest: deterministic
        clients[large].sort()
        clients[small].append(clients[large].pop())


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    return [chunk.tolist() for chunk in np.array_split(rng.permutation(n), num_clients)]


def _dirichlet(
    keys: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)  # first-appearance order of labels
    clients: list[list[int]] = []
    for _ in range(_MAX_DIRICHLET_TRIES):
        clients = [[] for _ in range(num_clients)]
        for members in groups.values():
            idx = rng.permutation(np.asarray(members))
            props = rng.dirichlet(np.full(num_clients, alpha))
            for c, chunk in enumerate(_split_by_proportions(idx, props)):
                clients[c].extend(chunk.tolist())
        if min(len(c) for c in clients) >= min_size:
            return clients
    _repair(clients, min_size)
    return clients


def _quantity(
    n: int, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    perm = rng.permutation(n)
    props = rng.dirichlet(np.full(num_clients, alpha))
    spare = n - num_clients * min_size
    raw = props * spare
    extra = np.floor(raw).astype(int)
    # Largest-remainder rounding so the sizes add up to n exactly.
    order = np.argsort(-(raw - extra), kind="stable")
    extra[order[: spare - int(extra.sum())]] += 1
    sizes = min_size + extra
    return [chunk.tolist() for chunk in np.split(perm, np.cumsum(sizes)[:-1])]


def partition(
    keys: Sequence[Hashable],
    num_clients: int,
    scheme: Scheme,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Partition the indices ``0..len(keys)-1`` among ``num_clients`` clients.

    Args:
        keys: one key per example (normally its label; only ``"dirichlet"`` looks at them).
        num_clients: number of clients (>= 1, at most ``len(keys) // min_size``).
        scheme: ``"iid"`` (shuffle, split evenly), ``"dirichlet"`` (label skew: each label's
            examples split with proportions ~ Dir(alpha·1)) or ``"quantity"`` (client sizes
            ~ Dir(alpha·1) over a random permutation).
        alpha: Dirichlet concentration (> 0); smaller is more skewed.
        seed: seed of the numpy generator; the result is a function of all the arguments.
        min_size: every client gets at least this many examples. ``"dirichlet"`` resamples up to
            100 times, then moves examples from the largest clients.

    Returns:
        One sorted index list per client; the lists are disjoint and cover all indices.
    """
    n = len(keys)
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}"
        )
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients > n:
        raise ValueError(f"more clients ({num_clients}) than examples ({n})")
    if num_clients * min_size > n:
        raise ValueError(
            f"{num_clients} clients with min_size={min_size} need {num_clients * min_size} "
            f"examples, only {n} available"
        )
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        clients = _iid(n, num_clients, rng)
    elif scheme == "dirichlet":
        clients = _dirichlet(keys, num_clients, alpha, min_size, rng)
    else:
        clients = _quantity(n, num_clients, alpha, min_size, rng)
    return [sorted(c) for c in clients]


def sample_participants(
    num_clients: int, participation: float | int, round: int, seed: int
) -> list[int]:
    """Sample the clients taking part in ``round`` (without replacement, sorted).

    Args:
        num_clients: total number of clients.
        participation: a float fraction in (0, 1] (``max(1, floor(fraction·num_clients))``
            clients; ``1.0`` = everyone) or an int count in [1, num_clients] (``1`` = one client).
        round: round number (>= 0); with ``seed`` it fully determines the sample.
        seed: experiment seed.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if round < 0 or seed < 0:
        raise ValueError(f"round and seed must be >= 0, got round={round}, seed={seed}")
    if isinstance(participation, bool):
        raise ValueError("participation must be a float fraction or an int count, not a bool")
    if isinstance(participation, int):
        if not 1 <= participation <= num_clients:
            raise ValueError(
                f"participation count must be in [1, {num_clients}], got {participation}"
            )
        count = participation
    elif isinstance(participation, float):
        if not 0.0 < participation <= 1.0:
            raise ValueError(f"participation fraction must be in (0, 1], got {participation}")
        count = max(1, math.floor(participation * num_clients + 1e-9))
    else:
        raise ValueError(f"participation must be a float or an int, got {participation!r}")
    rng = np.random.default_rng([seed, round])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))
