"""Direct unit tests of :func:`glora.validation.validate_updates`: one per error message."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from glora import ClientUpdate, InvalidUpdate, LoRAFactors
from glora.validation import DEFAULT_MAX_ABS, RoundInput, validate_updates

F64 = torch.float64


def fac(d: int = 4, k: int = 3, r: int = 2, dtype: torch.dtype = F64, seed: int = 0) -> LoRAFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoRAFactors(
        A=torch.randn(r, k, generator=gen, dtype=F64).to(dtype),
        B=torch.randn(d, r, generator=gen, dtype=F64).to(dtype),
    )


def good(n: int = 3) -> list[ClientUpdate]:
    """``n`` valid clients c0.. with modules ``q`` (4×3) and ``v`` (5×2), rank 2."""
    return [
        ClientUpdate(f"c{i}", float(i + 1), {"q": fac(seed=i), "v": fac(5, 2, seed=10 + i)})
        for i in range(n)
    ]


def with_factor(j: int, module: str, f: Any, n: int = 3) -> list[Any]:
    ups: list[Any] = good(n)
    u = ups[j]
    ups[j] = ClientUpdate(u.client_id, u.weight, {**u.factors, module: f})
    return ups


def with_weight(j: int, w: Any) -> list[Any]:
    ups: list[Any] = good()
    ups[j] = ClientUpdate(ups[j].client_id, w, ups[j].factors)
    return ups


def expect(
    ups: Any, client: str | None, module: str | None, text: str, **kwargs: Any
) -> InvalidUpdate:
    """``validate_updates(ups)`` raises naming ``client``/``module`` and containing ``text``."""
    with pytest.raises(InvalidUpdate) as info:
        validate_updates(ups, **kwargs)
    exc = info.value
    msg = str(exc)
    assert text.lower() in msg.lower(), msg
    assert exc.client_id == client, msg
    assert exc.module == module, msg
    if client is not None:
        assert f"client {client!r}" in msg
    if module is not None:
        assert f"module {module!r}" in msg
    return exc


def test_valid_round_is_normalised() -> None:
    ups = good()
    rnd = validate_updates(ups)
    assert isinstance(rnd, RoundInput)
    assert rnd.client_ids == ("c0", "c1", "c2") and rnd.modules == ("q", "v")
    assert rnd.shapes == {"q": (4, 3), "v": (5, 2)} and rnd.ranks["q"] == (2, 2, 2)
    assert torch.allclose(rnd.weights, torch.tensor([1, 2, 3], dtype=F64) / 6)
    assert rnd.dtype == F64 and not rnd.mixed_ranks()
    assert rnd.factors["q"][1] is ups[1].factors["q"]  # no copies for plain tensors
    assert DEFAULT_MAX_ABS == 1e6


def test_requires_grad_factors_are_detached_without_touching_the_input() -> None:
    f = fac()
    f = LoRAFactors(A=f.A.clone().requires_grad_(), B=f.B)
    rnd = validate_updates([ClientUpdate("c0", 1.0, {"q": f})])
    assert not rnd.factors["q"][0].A.requires_grad and f.A.requires_grad


# ---------------------------------------------------------------- the round as a whole
@pytest.mark.parametrize("ups", [[], ()])
def test_empty_round(ups: Any) -> None:
    expect(ups, None, None, "no client updates")


@pytest.mark.parametrize("ups", [None, 3, good()[0]])
def test_not_a_sequence(ups: Any) -> None:
    expect(ups, None, None, "sequence of ClientUpdate")


def test_a_generator_is_accepted() -> None:
    assert validate_updates(u for u in good()).n == 3


@pytest.mark.parametrize("obj", [None, {"weight": 1.0}, ("c1", 1.0, {})])
def test_not_a_client_update(obj: Any) -> None:
    ups: list[Any] = good()
    ups[1] = obj
    expect(ups, None, None, "update #1")


def test_duck_typed_update_names_its_client() -> None:
    class Fake:
        client_id = "impostor"

    ups: list[Any] = good()
    ups[2] = Fake()
    expect(ups, "impostor", None, "update #2 is Fake, not a ClientUpdate")


@pytest.mark.parametrize("cid", ["", 7, None])
def test_bad_client_id(cid: Any) -> None:
    ups: list[Any] = good()
    ups[1] = ClientUpdate(cid, 1.0, ups[1].factors)
    expect(ups, None, None, "update #1 has client_id")


def test_duplicate_client_id() -> None:
    ups: list[Any] = good()
    ups[2] = ClientUpdate("c0", 1.0, ups[2].factors)
    expect(ups, "c0", None, "duplicate client id")


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize(
    ("w", "text"),
    [
        (0.0, "finite and > 0"),
        (-1.0, "finite and > 0"),
        (math.nan, "finite and > 0"),
        (math.inf, "finite and > 0"),
        (np.float64(-2.0), "finite and > 0"),
        (True, "weight is bool"),
        ("3", "weight is str"),
        (None, "weight is NoneType"),
        (torch.tensor(1.0), "weight is Tensor"),
        (10**400, "cannot be converted to a float"),
    ],
)
def test_bad_weight(w: Any, text: str) -> None:
    expect(with_weight(1, w), "c1", None, text)


def test_weight_sum_overflow() -> None:
    ups = [ClientUpdate(u.client_id, 1e308, u.factors) for u in good()]
    expect(ups, None, None, "overflows")


# ---------------------------------------------------------------- module sets
@pytest.mark.parametrize("factors", [{}, None, [fac()], fac()])
def test_factors_not_a_non_empty_mapping(factors: Any) -> None:
    ups: list[Any] = good()
    ups[1] = ClientUpdate("c1", 1.0, factors)
    expect(ups, "c1", None, "non-empty mapping")


def test_extra_not_a_mapping() -> None:
    ups: list[Any] = good()
    ups[1] = ClientUpdate("c1", 1.0, ups[1].factors, [torch.zeros(2)])  # type: ignore[arg-type]
    expect(ups, "c1", None, "extra must be a mapping")


@pytest.mark.parametrize("name", ["", 3, None])
def test_bad_module_name(name: Any) -> None:
    expect(with_factor(1, name, fac()), "c1", None, "module names must be non-empty strings")


def test_missing_module() -> None:
    ups: list[Any] = good()
    ups[2] = ClientUpdate("c2", 1.0, {"q": ups[2].factors["q"]})
    expect(ups, "c2", "v", "missing module(s) ['v']")


def test_unexpected_module() -> None:
    expect(with_factor(1, "k", fac()), "c1", "k", "unexpected module(s) ['k']")


def test_module_set_differs_from_the_server() -> None:
    expect(good(), "c0", "k", "the server's module set", expected_shapes={"q": (4, 3), "k": (1, 1)})


# ---------------------------------------------------------------- factors
Bad = Callable[[LoRAFactors], Any]
FACTOR_CASES: list[tuple[str, Bad, str]] = [
    ("tuple", lambda f: (f.A, f.B), "factors are tuple, not LoRAFactors"),
    ("none", lambda f: None, "factors are NoneType, not LoRAFactors"),
    ("numpy A", lambda f: LoRAFactors(f.A.numpy(), f.B), "A is ndarray, not a torch.Tensor"),
    ("list B", lambda f: LoRAFactors(f.A, f.B.tolist()), "B is list, not a torch.Tensor"),
    ("int A", lambda f: LoRAFactors(f.A.long(), f.B), "A has dtype torch.int64"),
    ("bool B", lambda f: LoRAFactors(f.A, f.B.bool()), "B has dtype torch.bool"),
    ("half", lambda f: LoRAFactors(f.A.half(), f.B.half()), "A has dtype torch.float16"),
    ("bf16 B", lambda f: LoRAFactors(f.A, f.B.bfloat16()), "B has dtype torch.bfloat16"),
    ("complex", lambda f: LoRAFactors(f.A.to(torch.complex128), f.B), "A has dtype"),
    ("sparse", lambda f: LoRAFactors(f.A.to_sparse(), f.B), "dense (strided)"),
    (
        "meta",
        lambda f: LoRAFactors(torch.empty(2, 3, dtype=F64, device="meta"), f.B),
        "meta tensor",
    ),
    ("1-D", lambda f: LoRAFactors(f.A.reshape(-1), f.B), "A must be a matrix, got shape (6,)"),
    ("3-D", lambda f: LoRAFactors(f.A, f.B[None]), "B must be a matrix, got shape (1, 4, 2)"),
    ("nan", lambda f: LoRAFactors(f.A * math.nan, f.B), "A contains NaN or Inf"),
    ("inf", lambda f: LoRAFactors(f.A, f.B - math.inf), "B contains NaN or Inf"),
    ("huge", lambda f: LoRAFactors(f.A, f.B + 1e7), "above the limit 1e+06"),
    ("A/B dtype", lambda f: LoRAFactors(f.A, f.B.float()), "both factors need one dtype"),
    ("rank", lambda f: LoRAFactors(f.A, torch.zeros(4, 3, dtype=F64)), "A has 2 rows but B has 3"),
    (
        "rank 0",
        lambda f: LoRAFactors(torch.zeros(0, 3, dtype=F64), torch.zeros(4, 0, dtype=F64)),
        "rank 0",
    ),
    ("d=0", lambda f: LoRAFactors(f.A, torch.zeros(0, 2, dtype=F64)), "empty layer"),
    ("k=0", lambda f: LoRAFactors(torch.zeros(2, 0, dtype=F64), f.B), "empty layer"),
    ("d", lambda f: LoRAFactors(f.A, torch.zeros(5, 2, dtype=F64)), "update is 5×3"),
    ("k", lambda f: LoRAFactors(torch.zeros(2, 4, dtype=F64), f.B), "update is 4×4"),
]


@pytest.mark.parametrize(("label", "bad", "text"), FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_bad_factor(label: str, bad: Bad, text: str) -> None:
    expect(with_factor(1, "q", bad(fac(seed=1))), "c1", "q", text)


def test_dtype_differs_across_clients() -> None:
    expect(with_factor(2, "v", fac(5, 2, dtype=torch.float32)), "c2", "v", "differs from the round")


def test_max_abs_and_max_rank_options() -> None:
    expect(good(), "c0", "q", "above the limit", max_abs=0.01)
    expect(good(), "c0", "q", "exceeds the cap max_rank=1", max_rank=1)


def test_shape_differs_from_the_server() -> None:
    expect(good(), "c0", "q", "the module is 8×3", expected_shapes={"q": (8, 3), "v": (5, 2)})


# ---------------------------------------------------------------- extra tensors
def _with_extra(extras: list[dict[str, Any]]) -> list[ClientUpdate]:
    return [ClientUpdate(u.client_id, u.weight, u.factors, e) for u, e in zip(good(), extras)]


def test_extra_keys_differ() -> None:
    z = torch.zeros(2)
    expect(_with_extra([{"h": z}, {"h": z}, {"g": z}]), "c2", None, "extra tensors ['g', 'h']")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (torch.zeros(2, dtype=torch.long), "floating torch.Tensor"),
        ([0.0, 0.0], "floating torch.Tensor"),
        (torch.full((2,), math.nan), "NaN or Inf"),
        (torch.zeros(3), "has shape (3,), others (2,)"),
    ],
)
def test_bad_extra_tensor(value: Any, text: str) -> None:
    z = torch.zeros(2)
    exc = expect(_with_extra([{"h": z}, {"h": value}, {"h": z}]), "c1", None, text)
    assert "'h'" in str(exc)


def test_inputs_are_never_mutated() -> None:
    ups = good()
    before = [{m: (f.A.clone(), f.B.clone()) for m, f in u.factors.items()} for u in ups]
    validate_updates(ups)
    for u, b in zip(ups, before):
        for m, f in u.factors.items():
            assert torch.equal(f.A, b[m][0]) and torch.equal(f.B, b[m][1])
