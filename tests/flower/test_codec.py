"""Record codecs: LoRA factors and named tensors round-trip through ArrayRecord."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from glora.flower.codec import (
    RecordError,
    decode_factor_parts,
    decode_factors,
    decode_tensors,
    encode_factors,
    encode_tensors,
    factor_key,
)
from glora.types import LoRAFactors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_round_trip_exact(dtype: torch.dtype) -> None:
    factors = {
        "enc.layer.0.query": LoRAFactors(
            A=torch.randn(4, 6, dtype=dtype), B=torch.randn(5, 4, dtype=dtype)
        ),
        "enc.layer.0.value": LoRAFactors(
            A=torch.randn(6, 6, dtype=dtype), B=torch.randn(6, 6, dtype=dtype)
        ),
    }
    rec = encode_factors(factors)
    assert sorted(rec) == [
        "enc.layer.0.query/A",
        "enc.layer.0.query/B",
        "enc.layer.0.value/A",
        "enc.layer.0.value/B",
    ]
    back = decode_factors(rec)
    for m, f in factors.items():
        assert back[m].A.dtype == dtype
        assert torch.equal(back[m].A, f.A) and torch.equal(back[m].B, f.B)


def test_square_factors_are_told_apart_by_key_not_shape() -> None:
    A, B = torch.randn(3, 3), torch.randn(3, 3)
    back = decode_factors(encode_factors({"m": LoRAFactors(A=A, B=B)}))
    assert torch.equal(back["m"].A, A) and torch.equal(back["m"].B, B)


def test_partial_encoding_and_decoding() -> None:
    f = LoRAFactors(A=torch.randn(2, 3), B=torch.randn(4, 2))
    rec = encode_factors({"m": f}, ["B"])
    assert list(rec) == [factor_key("m", "B")]
    parts = decode_factor_parts(rec)
    assert set(parts["m"]) == {"B"}
    with pytest.raises(RecordError, match="lacks factor"):
        decode_factors(rec)


def test_bad_keys_and_dtypes_are_rejected() -> None:
    with pytest.raises(RecordError, match="unexpected key"):
        decode_factor_parts(ArrayRecord({"m.lora_A": Array(np.zeros((2, 2), np.float32))}))
    with pytest.raises(RecordError, match="unexpected key"):
        decode_factor_parts(ArrayRecord({"/A": Array(np.zeros((2, 2), np.float32))}))
    with pytest.raises(RecordError, match="float"):
        decode_factor_parts(ArrayRecord({"m/A": Array(np.zeros((2, 2), np.int64))}))
    with pytest.raises(RecordError, match="matrix"):
        decode_factor_parts(ArrayRecord({"m/A": Array(np.zeros((2, 2, 2), np.float32))}))


def test_tensors_round_trip() -> None:
    head = {"classifier.weight": torch.randn(2, 8), "classifier.bias": torch.randn(2)}
    back = decode_tensors(encode_tensors(head))
    assert set(back) == set(head)
    for k in head:
        assert torch.equal(back[k], head[k])
    assert encode_tensors(head).count_bytes() > 0
