"""Record codecs: LoRA factors, head tensors and base-weight deltas <-> Flower ``ArrayRecord``.

Every factor travels under an explicit key ``<module>/A`` or ``<module>/B`` (``A`` is ``r×k``,
``B`` is ``d×r``, LoRA scale folded into ``B``); A and B are never told apart by their shape.
Other tensors (a classification head) travel under their own names in a separate record.

Decoding never trusts the sender: a key without a ``/A`` or ``/B`` suffix, a non-float dtype or a
factor that is not a matrix raises :class:`RecordError` with a readable reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from glora.types import LoRAFactors

__all__ = [
    "FACTOR_NAMES",
    "RecordError",
    "decode_factor_parts",
    "decode_factors",
    "decode_tensors",
    "encode_factors",
    "encode_tensors",
    "factor_key",
]

#: The two factor names; a key is ``<module>/<name>``.
FACTOR_NAMES: tuple[str, str] = ("A", "B")

_FLOAT_KINDS = ("f",)


class RecordError(ValueError):
    """A record that cannot be decoded (bad key, dtype or shape)."""


def factor_key(module: str, name: str) -> str:
    """The record key of factor ``name`` (``"A"`` or ``"B"``) of ``module``."""
    if name not in FACTOR_NAMES:
        raise ValueError(f"factor name must be 'A' or 'B', got {name!r}")
    return f"{module}/{name}"


def _array(t: Tensor) -> Array:
    return Array(np.ascontiguousarray(t.detach().cpu().numpy()))


def _tensor(key: str, arr: Array) -> Tensor:
    try:
        nd = arr.numpy()
    except Exception as exc:  # corrupted bytes
        raise RecordError(f"array {key!r} cannot be decoded: {exc}") from exc
    if nd.dtype.kind not in _FLOAT_KINDS:
        raise RecordError(f"array {key!r} has dtype {nd.dtype}; a float array is required")
    return torch.from_numpy(np.array(nd, copy=True))


def encode_factors(
    factors: Mapping[str, LoRAFactors], which: Iterable[str] = FACTOR_NAMES
) -> ArrayRecord:
    """Encode the factors named in ``which`` of every module as ``<module>/A``, ``<module>/B``.

    Args:
        factors: module → folded factors.
        which: subset of ``{"A", "B"}`` to include (e.g. a plan's ``download`` or ``upload``).
    """
    names = [n for n in FACTOR_NAMES if n in set(which)]
    arrays: dict[str, Array] = {}
    for module in sorted(factors):
        f = factors[module]
        for name in names:
            arrays[factor_key(module, name)] = _array(f.A if name == "A" else f.B)
    return ArrayRecord(arrays)


def decode_factor_parts(record: ArrayRecord) -> dict[str, dict[str, Tensor]]:
    """Decode a (possibly partial) factor record into module → ``{"A": …, "B": …}``.

    A module may carry only ``A`` or only ``B`` (e.g. a download of ``B`` alone).

    Raises:
        RecordError: a key without a module or a ``/A``/``/B`` suffix, a non-float array or a
            factor that is not a matrix.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for key in record:
        module, sep, name = key.rpartition("/")
        if not sep or not module or name not in FACTOR_NAMES:
            raise RecordError(
                f"unexpected key {key!r}: factor keys are '<module>/A' or '<module>/B'"
            )
        t = _tensor(key, record[key])
        if t.dim() != 2:
            raise RecordError(f"factor {key!r} must be a matrix, got shape {tuple(t.shape)}")
        parts.setdefault(module, {})[name] = t
    return parts


def decode_factors(record: ArrayRecord) -> dict[str, LoRAFactors]:
    """Decode a complete factor record (both ``A`` and ``B`` of every module).

    Raises:
        RecordError: as :func:`decode_factor_parts`, or a module that lacks ``A`` or ``B``.
    """
    out: dict[str, LoRAFactors] = {}
    for module, named in decode_factor_parts(record).items():
        missing = [n for n in FACTOR_NAMES if n not in named]
        if missing:
            raise RecordError(f"module {module!r} lacks factor(s) {', '.join(missing)}")
        out[module] = LoRAFactors(A=named["A"], B=named["B"])
    return out


def encode_tensors(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Encode named tensors (e.g. a classification head) under their own names."""
    return ArrayRecord({name: _array(tensors[name]) for name in sorted(tensors)})


def decode_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Inverse of :func:`encode_tensors` (float arrays only; :class:`RecordError` otherwise)."""
    return {key: _tensor(key, record[key]) for key in record}
