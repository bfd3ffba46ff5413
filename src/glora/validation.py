"""Validation of client updates: every check that a server runs before it touches its state.

:func:`validate_updates` either returns a normalised, read-only :class:`RoundInput` or raises
:class:`~glora.types.InvalidUpdate` naming the client, the module and the problem. It never
mutates its inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors

__all__ = ["DEFAULT_MAX_ABS", "RoundInput", "validate_updates"]

#: Default bound on the absolute value of any factor entry. Trained LoRA factors are O(1); a
#: value beyond this is a corrupted or hostile upload (its products would overflow float32).
DEFAULT_MAX_ABS = 1e6

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class RoundInput:
    """A validated round: the updates of ``n`` clients over a common module set.

    Attributes:
        client_ids: client ids in the order given.
        weights: ``(n,)`` float64 aggregation weights ``p_i``, normalised to sum to 1.
        modules: module names, sorted.
        shapes: module → ``(d, k)``.
        ranks: module → per-client ranks.
        dtype: the common floating dtype of all factors.
        factors: module → per-client :class:`LoRAFactors`, in client order.
        extra: per-client non-LoRA tensors (may be empty dicts).
    """

    client_ids: tuple[str, ...]
    weights: Tensor
    modules: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    factors: dict[str, list[LoRAFactors]]
    extra: tuple[Mapping[str, Tensor], ...]

    @property
    def n(self) -> int:
        return len(self.client_ids)

    def p(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weights ``p_i`` as a tensor of ``dtype`` (default: the round's dtype)."""
        return self.weights.to(dtype or self.dtype)

    def mixed_ranks(self) -> bool:
        """True if some module has clients of different ranks."""
        return any(len(set(r)) > 1 for r in self.ranks.values())

    def max_rank(self, module: str) -> int:
        return max(self.ranks[module])


def _check_tensor(t: object, what: str, cid: str, module: str, max_abs: float) -> Tensor:
    """Check one factor: a dense, real, float32/float64, finite, bounded matrix; return it typed."""
    if not isinstance(t, Tensor):
        raise InvalidUpdate(
            f"{what} is {type(t).__name__}, not a torch.Tensor", client_id=cid, module=module
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise InvalidUpdate(
            f"{what} has dtype {t.dtype}; use float32 or float64", client_id=cid, module=module
        )
    if t.layout != torch.strided:
        raise InvalidUpdate(
            f"{what} has layout {t.layout}; send a dense (strided) tensor",
            client_id=cid,
            module=module,
        )
    if t.device.type == "meta":
        raise InvalidUpdate(f"{what} is a meta tensor without values", client_id=cid, module=module)
    if t.dim() != 2:
        raise InvalidUpdate(
            f"{what} must be a matrix, got shape {tuple(t.shape)}", client_id=cid, module=module
        )
    t_values = t.detach()  # checks read values only: no autograd graph, no grad warnings
    if t.numel() and not bool(torch.isfinite(t_values).all()):
        raise InvalidUpdate(f"{what} contains NaN or Inf values", client_id=cid, module=module)
    if t.numel():
        biggest = float(t_values.abs().max())
        if biggest > max_abs:
            raise InvalidUpdate(
                f"{what} has an entry of magnitude {biggest:.3g}, above the limit {max_abs:.3g} "
                "(raise max_abs if this is intended)",
                client_id=cid,
                module=module,
            )
    return t


def validate_updates(
    updates: Sequence[ClientUpdate],
    *,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_rank: int | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
) -> RoundInput:
    """Check a round's updates and return them normalised.

    Checks: a non-empty list of :class:`ClientUpdate`; unique non-empty string client ids;
    finite weights > 0; the same module set for every client (and equal to
    ``expected_shapes``' keys when given); per module, ``A`` (r×k) and ``B`` (d×r) dense real
    matrices of one common dtype (float32 or float64) on one device, the rank of ``A`` and ``B``
    equal and ≥ 1 (and ≤ ``max_rank``), ``d, k ≥ 1`` and equal across clients (and to
    ``expected_shapes``), all values finite and at most ``max_abs`` in magnitude; ``extra``
    tensors with the same keys and shapes across clients, finite.

    Raises:
        InvalidUpdate: naming the client, the module and the problem.
    """
    if isinstance(updates, (str, bytes)) or not isinstance(updates, Sequence):
        try:
            updates = list(updates)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidUpdate(
                f"updates must be a sequence of ClientUpdate, got {type(updates).__name__}"
            ) from None
    if len(updates) == 0:
        raise InvalidUpdate("no client updates were given: a round needs at least one")

    seen: set[str] = set()
    raw_weights: list[float] = []
    for i, u in enumerate(updates):
        if not isinstance(u, ClientUpdate):
            try:  # duck-typed objects: name the client if we can
                named = getattr(u, "client_id", None)
            except Exception:
                named = None
            raise InvalidUpdate(
                f"update #{i} is {type(u).__name__}, not a ClientUpdate",
                client_id=named if isinstance(named, str) and named else None,
            )
        cid = u.client_id
        if not isinstance(cid, str) or not cid:
            raise InvalidUpdate(f"update #{i} has client_id {cid!r}; use a non-empty string")
        if cid in seen:
            raise InvalidUpdate("duplicate client id: two updates in one round", client_id=cid)
        seen.add(cid)
        w = u.weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise InvalidUpdate(f"weight is {type(w).__name__}, not a number", client_id=cid)
        try:
            w = float(w)
        except (OverflowError, ValueError, TypeError):
            raise InvalidUpdate(
                f"weight {u.weight!r} cannot be converted to a float", client_id=cid
            ) from None
        if not math.isfinite(w) or w <= 0:
            raise InvalidUpdate(f"weight must be finite and > 0, got {w!r}", client_id=cid)
        raw_weights.append(w)
        if not isinstance(u.factors, Mapping) or len(u.factors) == 0:
            raise InvalidUpdate(
                "factors must be a non-empty mapping of module names", client_id=cid
            )
        if not isinstance(u.extra, Mapping):
            raise InvalidUpdate("extra must be a mapping of tensor names", client_id=cid)

    first = updates[0]
    reference = set(expected_shapes) if expected_shapes is not None else set(first.factors)
    ref_label = (
        "the server's module set"
        if expected_shapes is not None
        else (f"the module set of client {first.client_id!r}")
    )
    for u in updates:
        names = set(u.factors)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise InvalidUpdate(
                f"module names must be non-empty strings, got {bad[0]!r}", client_id=u.client_id
            )
        missing = sorted(reference - names)
        extra = sorted(names - reference)
        if missing:
            raise InvalidUpdate(
                f"missing module(s) {missing[:5]} that {ref_label} has",
                client_id=u.client_id,
                module=missing[0],
            )
        if extra:
            raise InvalidUpdate(
                f"unexpected module(s) {extra[:5]} not in {ref_label}",
                client_id=u.client_id,
                module=extra[0],
            )

    modules = tuple(sorted(reference))
    shapes: dict[str, tuple[int, int]] = dict(expected_shapes or {})
    ranks: dict[str, list[int]] = {m: [] for m in modules}
    factors: dict[str, list[LoRAFactors]] = {m: [] for m in modules}
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    for u in updates:
        cid = u.client_id
        for m in modules:
            f = u.factors[m]
            if not isinstance(f, LoRAFactors):
                raise InvalidUpdate(
                    f"factors are {type(f).__name__}, not LoRAFactors", client_id=cid, module=m
                )
            A = _check_tensor(f.A, "A", cid, m, max_abs)
            B = _check_tensor(f.B, "B", cid, m, max_abs)
            if A.dtype != B.dtype:
                raise InvalidUpdate(
                    f"A is {A.dtype} but B is {B.dtype}; both factors need one dtype",
                    client_id=cid,
                    module=m,
                )
            if dtype is None:
                dtype, device = A.dtype, A.device
            elif A.dtype != dtype:
                raise InvalidUpdate(
                    f"dtype {A.dtype} differs from the round's {dtype}; "
                    "send every update in one dtype",
                    client_id=cid,
                    module=m,
                )
            if A.device != device or B.device != device:
                raise InvalidUpdate(
                    f"tensors are on {A.device}/{B.device}, expected {device}",
                    client_id=cid,
                    module=m,
                )
            r = int(A.shape[0])
            if int(B.shape[1]) != r:
                raise InvalidUpdate(
                    f"A has {r} rows but B has {B.shape[1]} columns (the rank must agree; "
                    "A is r×k and B is d×r)",
                    client_id=cid,
                    module=m,
                )
            if r < 1:
                raise InvalidUpdate("rank 0: A and B have no components", client_id=cid, module=m)
            if max_rank is not None and r > max_rank:
                raise InvalidUpdate(
                    f"rank {r} exceeds the cap max_rank={max_rank}", client_id=cid, module=m
                )
            d, k = int(B.shape[0]), int(A.shape[1])
            if d < 1 or k < 1:
                raise InvalidUpdate(
                    f"empty layer: the update is {d}×{k} (B has {d} rows, A has {k} columns)",
                    client_id=cid,
                    module=m,
                )
            if m in shapes:
                if (d, k) != tuple(shapes[m]):
                    exp = shapes[m]
                    raise InvalidUpdate(
                        f"update is {d}×{k} (B has {d} rows, A has {k} columns) but the module is "
                        f"{exp[0]}×{exp[1]}",
                        client_id=cid,
                        module=m,
                    )
            else:
                shapes[m] = (d, k)
            ranks[m].append(r)
            if A.requires_grad or B.requires_grad:  # no autograd graph in the server state
                f = LoRAFactors(A=A.detach(), B=B.detach())
            factors[m].append(f)

    extra_keys = set(first.extra)
    extra_shapes = {}
    for u in updates:
        if set(u.extra) != extra_keys:
            diff = sorted(set(u.extra) ^ extra_keys)
            raise InvalidUpdate(
                f"extra tensors {diff[:5]} differ from client {first.client_id!r}'s",
                client_id=u.client_id,
            )
        for name, t in u.extra.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise InvalidUpdate(
                    f"extra tensor {name!r} must be a floating torch.Tensor", client_id=u.client_id
                )
            if not bool(torch.isfinite(t).all()):
                raise InvalidUpdate(
                    f"extra tensor {name!r} contains NaN or Inf", client_id=u.client_id
                )
            if name in extra_shapes and tuple(t.shape) != extra_shapes[name]:
                raise InvalidUpdate(
                    f"extra tensor {name!r} has shape {tuple(t.shape)}, "
                    f"others {extra_shapes[name]}",
                    client_id=u.client_id,
                )
            extra_shapes[name] = tuple(t.shape)

    w = torch.tensor(raw_weights, dtype=torch.float64)
    total = float(w.sum())
    if not math.isfinite(total):
        raise InvalidUpdate("the sum of the client weights overflows; rescale the weights")
    assert dtype is not None
    return RoundInput(
        client_ids=tuple(u.client_id for u in updates),
        weights=w / total,
        modules=modules,
        shapes={m: shapes[m] for m in modules},
        ranks={m: tuple(r) for m, r in ranks.items()},
        dtype=dtype,
        factors=factors,
        extra=tuple(u.extra for u in updates),
    )
