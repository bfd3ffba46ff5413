"""Fuzzing every aggregator with malformed client updates (hypothesis).

Each generated round starts from a valid one (1–4 clients, 1–2 modules, d, k ≤ 12, rank ≤ 4,
float32 or float64) and receives exactly one corruption. The aggregator already holds a state
from a valid round; the corrupted round must raise :class:`glora.InvalidUpdate` (or a subclass)
whose message names the client and, when the problem is local to one, the module; the state must
be unchanged (same object, same tensors, same metadata). Degenerate but valid rounds must give
finite results, exact where the method is exact.

``EXAMPLES`` counts the examples that actually ran; ``test_zz_example_count`` checks that the
malformed-update fuzzing ran at least 200 of them in total.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glora import ClientUpdate, InvalidUpdate, LoRAFactors, ServerState, aggregators
from glora.aggregators.base import Aggregator

NAMES = aggregators.available()
#: Malformed examples per aggregator (12 rules × 24 = 288 ≥ 200).
MALFORMED_PER_RULE = 24
#: Examples that ran, per test and rule (incremented inside the test bodies).
EXAMPLES: Counter[str] = Counter()

# Rules whose result equals the dense weighted average Σ p_i B_i A_i, and how to read it out.
EXACT_OPTIONS: dict[str, dict[str, Any]] = {
    "glora": {"server_rank": 64},
    "flexlora": {},
    "fedex": {},
    "flora": {},
}
# Rules that return a single client's own update (readout at full rank).
OWN_UPDATE_BACK = {
    *EXACT_OPTIONS,
    "fedit",
    "hetlora",
    "fedrot",
    "florana",
    "lorafair",
    "ffa",
    "rolora",
}

SETTINGS = settings(
    max_examples=MALFORMED_PER_RULE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def build(name: str, **options: Any) -> Aggregator:
    """Build rule ``name`` or skip if its module is not written yet."""
    try:
        cls = aggregators.get_class(name)
    except (ModuleNotFoundError, AttributeError) as exc:
        pytest.skip(f"aggregator {name!r} is not implemented yet ({exc})")
    opts = dict(options)
    if not cls.mixed_ranks:
        opts.setdefault("pad", True)
    return cls(**opts)


# ---------------------------------------------------------------- valid rounds
@dataclass
class Round:
    """A generated valid round and the data needed to corrupt it."""

    shapes: dict[str, tuple[int, int]]
    rank: int
    dtype: torch.dtype
    updates: list[ClientUpdate]


def make_factors(
    shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype, gen: torch.Generator
) -> dict[str, LoRAFactors]:
    """Random O(1) factors of ``rank`` for every module."""
    return {
        m: LoRAFactors(
            A=(0.5 * torch.randn(rank, k, generator=gen, dtype=torch.float64)).to(dtype),
            B=(0.5 * torch.randn(d, rank, generator=gen, dtype=torch.float64)).to(dtype),
        )
        for m, (d, k) in shapes.items()
    }


@st.composite
def valid_rounds(draw: st.DrawFn, min_clients: int = 1, min_modules: int = 1) -> Round:
    """A valid round: 1–4 clients of one rank (1–4), 1–2 modules of d, k in 1..12."""
    n_mod = draw(st.integers(min_modules, 2))
    names = ["enc.0.q", "enc.1.v"][:n_mod]
    shapes = {m: (draw(st.integers(1, 12)), draw(st.integers(1, 12))) for m in names}
    rank = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(min_clients, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    weights = [draw(st.floats(0.1, 100.0)) for _ in range(n)]
    updates = [
        ClientUpdate(f"c{i}", weights[i], make_factors(shapes, rank, dtype, gen)) for i in range(n)
    ]
    return Round(shapes, rank, dtype, updates)


def aggregator_with_state(name: str, rnd: Round) -> Aggregator:
    """An aggregator of ``name`` with a state from one valid round of ``rnd``'s layout."""
    agg = build(name)
    gen = torch.Generator().manual_seed(12345)
    agg.init_state(make_factors(rnd.shapes, rnd.rank, rnd.dtype, gen))
    warm = [
        ClientUpdate(f"w{i}", 1.0 + i, make_factors(rnd.shapes, rnd.rank, rnd.dtype, gen))
        for i in range(2)
    ]
    agg.aggregate(warm)
    assert agg.state is not None and agg.state.round == 1
    return agg


def snapshot(state: ServerState) -> dict[str, Any]:
    """A deep copy of everything in ``state`` (tensors cloned)."""
    return {
        "round": state.round,
        "method": state.method,
        "flat": {k: v.clone() for k, v in state.flat_tensors().items()},
        "info": copy.deepcopy(state.info),
        "diagnostics": copy.deepcopy(state.diagnostics),
    }


def assert_unchanged(agg: Aggregator, before_obj: ServerState, before: dict[str, Any]) -> None:
    """The aggregator still holds the same state object with the same contents."""
    state = agg.state
    assert state is before_obj
    assert state.round == before["round"] and state.method == before["method"]
    flat = state.flat_tensors()
    assert flat.keys() == before["flat"].keys()
    for key, t in flat.items():
        assert torch.equal(t, before["flat"][key]), key
    assert state.info == before["info"]
    assert state.diagnostics == before["diagnostics"]


# ---------------------------------------------------------------- corruptions
@dataclass
class Corrupted:
    """A corrupted round and what its error message must name."""

    kind: str
    updates: Any
    client: str | None  # the client id the message must name (None: not local to a client)
    module: str | None  # the module the message must name (None: not local to a module)
    text: str | None = None  # another substring the message must contain


def _replace_factor(
    u: ClientUpdate, module: str, *, A: Any = None, B: Any = None, keep: bool = True
) -> ClientUpdate:
    f = u.factors[module]
    new = dict(u.factors)
    new[module] = LoRAFactors(A=f.A if A is None else A, B=f.B if B is None else B)
    return ClientUpdate(u.client_id, u.weight, new, u.extra)


def _with(updates: list[ClientUpdate], j: int, new: Any) -> list[Any]:
    out: list[Any] = list(updates)
    out[j] = new
    return out


@st.composite
def corrupted_rounds(draw: st.DrawFn, rnd: Round) -> Corrupted:
    """Apply one drawn corruption to client ``j`` (and module ``m``) of ``rnd``."""
    ups = rnd.updates
    n = len(ups)
    kinds = [
        "d_mismatch",
        "k_mismatch",
        "rank_mismatch",
        "missing_module",
        "extra_module",
        "nan",
        "inf",
        "weight_zero",
        "weight_negative",
        "weight_nan",
        "weight_inf",
        "weight_bool",
        "weight_str",
        "weight_none",
        "weight_huge_int",
        "dtype_ab",
        "int_tensor",
        "float16",
        "bfloat16",
        "complex",
        "non_tensor",
        "dim1",
        "dim3",
        "empty_list",
        "absurd_norm",
        "empty_module_name",
        "non_str_module_name",
        "non_clientupdate",
        "bad_client_id",
        "non_lorafactors",
        "factors_not_mapping",
        "empty_factors",
        "zero_rank",
        "sparse",
        "not_a_sequence",
        "extra_nan",
        "empty_dim",
        "meta",
    ]
    if n >= 2:
        kinds += ["dtype_across_clients", "duplicate_id", "d_mismatch_no_state"]
    kind = draw(st.sampled_from(kinds))
    j = draw(st.integers(0, n - 1))
    u = ups[j]
    cid = u.client_id
    m = draw(st.sampled_from(sorted(rnd.shapes)))
    f = u.factors[m]
    d, k = rnd.shapes[m]
    r = rnd.rank
    dt = rnd.dtype
    other = torch.float64 if dt == torch.float32 else torch.float32
    if kind in ("d_mismatch", "d_mismatch_no_state"):
        if kind == "d_mismatch_no_state":  # without a server state client 0 sets the shapes
            j = draw(st.integers(1, n - 1))
            u, cid = ups[j], ups[j].client_id
        extra_rows = draw(st.integers(1, 3)) * draw(st.sampled_from([-1, 1]))
        d2 = d + extra_rows if d + extra_rows >= 1 else d + 1
        B = torch.zeros(d2, r, dtype=dt)
        return Corrupted(kind, _with(ups, j, _replace_factor(u, m, B=B)), cid, m)
    if kind == "k_mismatch":
        k2 = k + 1 if draw(st.booleans()) or k == 1 else k - 1
        A = torch.zeros(r, k2, dtype=dt)
        return Corrupted(kind, _with(ups, j, _replace_factor(u, m, A=A)), cid, m)
    if kind == "rank_mismatch":
        r2 = draw(st.sampled_from([x for x in range(1, 6) if x != r]))
        B = torch.zeros(d, r2, dtype=dt)
        return Corrupted(kind, _with(ups, j, _replace_factor(u, m, B=B)), cid, m, "rank")
    if kind == "missing_module":
        new = {key: v for key, v in u.factors.items() if key != m}
        bad = ClientUpdate(cid, u.weight, new)
        return Corrupted(kind, _with(ups, j, bad), cid, m if new else None)
    if kind == "extra_module":
        new = dict(u.factors)
        new["zz.unexpected"] = f
        return Corrupted(
            kind, _with(ups, j, ClientUpdate(cid, u.weight, new)), cid, "zz.unexpected"
        )
    if kind in ("nan", "inf", "absurd_norm"):
        value = {
            "nan": math.nan,
            "inf": draw(st.sampled_from([math.inf, -math.inf])),
            "absurd_norm": draw(st.sampled_from([1.0, -1.0])) * draw(st.floats(1e7, 1e30)),
        }[kind]
        which = draw(st.sampled_from(["A", "B"]))
        t = (f.A if which == "A" else f.B).clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        bad = _replace_factor(u, m, **{which: t})
        return Corrupted(kind, _with(ups, j, bad), cid, m)
    if kind.startswith("weight_"):
        w = {
            "weight_zero": 0.0,
            "weight_negative": -draw(st.floats(1e-6, 1e6)),
            "weight_nan": math.nan,
            "weight_inf": math.inf,
            "weight_bool": True,
            "weight_str": "3",
            "weight_none": None,
            "weight_huge_int": 10**400,
        }[kind]
        return Corrupted(kind, _with(ups, j, ClientUpdate(cid, w, u.factors)), cid, None, "weight")
    if kind == "dtype_ab":
        bad = _replace_factor(u, m, B=f.B.to(other))
        return Corrupted(kind, _with(ups, j, bad), cid, m, "dtype")
    if kind == "dtype_across_clients":
        j = draw(st.integers(1, n - 1))
        u = ups[j]
        new = {key: v.to(other) for key, v in u.factors.items()}
        bad = ClientUpdate(u.client_id, u.weight, new)
        return Corrupted(kind, _with(ups, j, bad), u.client_id, sorted(new)[0], "dtype")
    if kind in ("int_tensor", "float16", "bfloat16", "complex"):
        target = {
            "int_tensor": draw(st.sampled_from([torch.int64, torch.int32, torch.bool])),
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "complex": torch.complex64,
        }[kind]
        which = draw(st.sampled_from(["A", "B"]))
        t = (f.A if which == "A" else f.B).to(target)
        bad = _replace_factor(u, m, **{which: t})
        return Corrupted(kind, _with(ups, j, bad), cid, m, "dtype")
    if kind == "non_tensor":
        which = draw(st.sampled_from(["A", "B"]))
        src = f.A if which == "A" else f.B
        value = draw(st.sampled_from(["numpy", "list", "none", "float"]))
        t = {
            "numpy": src.numpy(),
            "list": src.tolist(),
            "none": None,
            "float": 1.0,
        }[value]
        new = dict(u.factors)
        new[m] = LoRAFactors(A=t if which == "A" else f.A, B=t if which == "B" else f.B)
        bad = ClientUpdate(cid, u.weight, new)
        return Corrupted(kind, _with(ups, j, bad), cid, m, "torch.Tensor")
    if kind == "dim1":
        which = draw(st.sampled_from(["A", "B"]))
        t = (f.A if which == "A" else f.B).reshape(-1)
        bad = _replace_factor(u, m, **{which: t})
        return Corrupted(kind, _with(ups, j, bad), cid, m, "matrix")
    if kind == "dim3":
        which = draw(st.sampled_from(["A", "B"]))
        t = (f.A if which == "A" else f.B).unsqueeze(0)
        bad = _replace_factor(u, m, **{which: t})
        return Corrupted(kind, _with(ups, j, bad), cid, m, "matrix")
    if kind == "empty_list":
        return Corrupted(kind, draw(st.sampled_from([[], ()])), None, None, "no client updates")
    if kind == "empty_module_name":
        new = dict(u.factors)
        new[""] = f
        return Corrupted(kind, _with(ups, j, ClientUpdate(cid, u.weight, new)), cid, None, "module")
    if kind == "non_str_module_name":
        new: dict[Any, LoRAFactors] = dict(u.factors)
        new[draw(st.sampled_from([3, None, ("a",)]))] = f
        return Corrupted(kind, _with(ups, j, ClientUpdate(cid, u.weight, new)), cid, None, "module")
    if kind == "non_clientupdate":
        obj = draw(st.sampled_from(["dict", "tuple", "none", "factors"]))
        bad = {
            "dict": {"client_id": cid, "weight": 1.0, "factors": u.factors},
            "tuple": (cid, 1.0, u.factors),
            "none": None,
            "factors": u.factors,
        }[obj]
        return Corrupted(kind, _with(ups, j, bad), None, None, f"update #{j}")
    if kind == "bad_client_id":
        bad_id = draw(st.sampled_from(["", 7, None, b"c0"]))
        bad = ClientUpdate(bad_id, u.weight, u.factors)  # type: ignore[arg-type]
        return Corrupted(kind, _with(ups, j, bad), None, None, f"update #{j}")
    if kind == "duplicate_id":
        i, j = sorted(draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)))
        dup = ClientUpdate(ups[i].client_id, ups[j].weight, ups[j].factors)
        return Corrupted(kind, _with(ups, j, dup), ups[i].client_id, None, "duplicate")
    if kind == "non_lorafactors":
        new = dict(u.factors)
        new[m] = draw(st.sampled_from([(f.A, f.B), {"A": f.A, "B": f.B}, f.A, None]))
        bad = ClientUpdate(cid, u.weight, new)
        return Corrupted(kind, _with(ups, j, bad), cid, m, "LoRAFactors")
    if kind == "factors_not_mapping":
        value = draw(st.sampled_from(["list", "none", "factors"]))
        fac = {"list": list(u.factors.values()), "none": None, "factors": f}[value]
        bad = ClientUpdate(cid, u.weight, fac)  # type: ignore[arg-type]
        return Corrupted(kind, _with(ups, j, bad), cid, None, "mapping")
    if kind == "empty_factors":
        bad = ClientUpdate(cid, u.weight, {})
        return Corrupted(kind, _with(ups, j, bad), cid, None)
    if kind == "zero_rank":
        bad = _replace_factor(u, m, A=torch.zeros(0, k, dtype=dt), B=torch.zeros(d, 0, dtype=dt))
        return Corrupted(kind, _with(ups, j, bad), cid, m, "rank")
    if kind == "sparse":
        which = draw(st.sampled_from(["A", "B"]))
        t = (f.A if which == "A" else f.B).to_sparse()
        bad = _replace_factor(u, m, **{which: t})
        return Corrupted(kind, _with(ups, j, bad), cid, m)
    if kind == "not_a_sequence":
        value = draw(st.sampled_from(["update", "none", "int", "str"]))
        bad_round = {"update": u, "none": None, "int": 3, "str": "c0"}[value]
        return Corrupted(kind, bad_round, None, None)
    if kind == "empty_dim":
        if draw(st.booleans()):
            bad = _replace_factor(u, m, B=torch.zeros(0, r, dtype=dt))
        else:
            bad = _replace_factor(u, m, A=torch.zeros(r, 0, dtype=dt))
        return Corrupted(kind, _with(ups, j, bad), cid, m, "empty")
    if kind == "meta":
        bad = _replace_factor(u, m, A=torch.empty(r, k, dtype=dt, device="meta"))
        return Corrupted(kind, _with(ups, j, bad), cid, m, "meta")
    if kind == "extra_nan":
        extra = {"head.weight": torch.full((2, 3), math.nan)}
        new_ups = [
            ClientUpdate(x.client_id, x.weight, x.factors, {"head.weight": torch.zeros(2, 3)})
            for x in ups
        ]
        new_ups[j] = ClientUpdate(cid, u.weight, u.factors, extra)
        return Corrupted(kind, new_ups, cid, None, "head.weight")
    raise AssertionError(kind)  # pragma: no cover


def check_message(exc: InvalidUpdate, case: Corrupted) -> None:
    """The error names the client (and module) of the corruption, and the problem."""
    msg = str(exc)
    if case.client is not None:
        assert f"client {case.client!r}" in msg, (case.kind, msg)
        assert exc.client_id == case.client, (case.kind, msg)
    if case.module is not None:
        assert f"module {case.module!r}" in msg, (case.kind, msg)
        assert exc.module == case.module, (case.kind, msg)
    if case.text is not None:
        assert case.text.lower() in msg.lower(), (case.kind, msg)


# ---------------------------------------------------------------- malformed updates
@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_malformed_update_raises_and_keeps_state(name: str, data: st.DataObject) -> None:
    """One corruption → InvalidUpdate naming client/module; the previous state is untouched."""
    rnd = data.draw(valid_rounds(), label="round")
    case = data.draw(corrupted_rounds(rnd), label="corruption")
    if case.kind == "d_mismatch_no_state":
        agg = build(name)
        with pytest.raises(InvalidUpdate) as info:
            agg.aggregate(case.updates)
        check_message(info.value, case)
        assert agg.state is None
        EXAMPLES[f"malformed/{name}"] += 1
        EXAMPLES[f"kind/{case.kind}"] += 1
        return
    agg = aggregator_with_state(name, rnd)
    before_obj = agg.state
    assert before_obj is not None
    before = snapshot(before_obj)
    with pytest.raises(InvalidUpdate) as info:
        agg.aggregate(case.updates)
    check_message(info.value, case)
    assert_unchanged(agg, before_obj, before)
    # The valid round still aggregates afterwards (the failure left nothing half-done).
    agg.aggregate(rnd.updates)
    assert agg.state is not before_obj and agg.state.round == before["round"] + 1
    EXAMPLES[f"malformed/{name}"] += 1
    EXAMPLES[f"kind/{case.kind}"] += 1


# ---------------------------------------------------------------- degenerate but valid
def dense_oracle(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """``Σ p_i B_i A_i`` in float64."""
    total = sum(float(u.weight) for u in updates)
    out: dict[str, torch.Tensor] = {}
    for u in updates:
        for m, f in u.factors.items():
            term = (float(u.weight) / total) * (f.B.double() @ f.A.double())
            out[m] = term if m not in out else out[m] + term
    return out


def global_products(name: str, agg: Aggregator) -> dict[str, torch.Tensor]:
    """The global model's total update per module: ``effective_update`` (base ⊕ readout)."""
    assert agg.state is not None
    eff = agg.effective_update(agg.state)
    return {m: f.B.double() @ f.A.double() for m, f in eff.items()}


def assert_finite_everywhere(agg: Aggregator, rank: int) -> None:
    """Readouts (full and at ``rank``) and the effective update are finite."""
    state = agg.state
    assert state is not None
    for r in (None, rank, rank + 1):
        for m, f in agg.readout(state, r).items():
            assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), (m, r)
    for m, f in agg.effective_update(state).items():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), m


def assert_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: Any, *, loose: bool = False
) -> None:
    """``‖got − want‖_F ≤ tol · max(1, ‖want‖_F)`` per module (``loose``: iterative rules)."""
    tol = 1e-4 if dtype == torch.float32 else (1e-6 if loose else 1e-9)
    for m, w in want.items():
        g = got[m]
        scale = max(1.0, float(w.norm()))
        assert float((g - w).norm()) <= tol * scale, (m, float((g - w).norm()), scale)


Transform = Callable[[LoRAFactors, torch.Generator], LoRAFactors]


def _zero(f: LoRAFactors, gen: torch.Generator) -> LoRAFactors:
    return LoRAFactors(A=torch.zeros_like(f.A), B=torch.zeros_like(f.B))


def _rank_deficient(f: LoRAFactors, gen: torch.Generator) -> LoRAFactors:
    """``B`` with a zero column and a duplicated column (rank < r)."""
    B = f.B.clone()
    if B.shape[1] >= 2:
        B[:, -1] = B[:, 0]
    B[:, 0] = 0
    return LoRAFactors(A=f.A, B=B)


def _zero_A_rows(f: LoRAFactors, gen: torch.Generator) -> LoRAFactors:
    A = f.A.clone()
    A[: max(1, A.shape[0] // 2)] = 0
    return LoRAFactors(A=A, B=f.B)


DEGENERATE: dict[str, Transform] = {
    "all_zero": _zero,
    "rank_deficient_B": _rank_deficient,
    "zero_rows_A": _zero_A_rows,
}


@st.composite
def degenerate_rounds(draw: st.DrawFn) -> tuple[str, Round]:
    """A valid round made degenerate: zero, rank-deficient, or rank larger than d or k."""
    kind = draw(st.sampled_from([*DEGENERATE, "rank_above_dims"]))
    rnd = draw(valid_rounds())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "rank_above_dims":
        d, k = draw(st.sampled_from([(3, 5), (5, 3), (2, 2), (1, 4), (4, 1)]))
        shapes = dict.fromkeys(rnd.shapes, (d, k))
        rank = draw(st.integers(min(d, k) + 1, 4)) if min(d, k) < 4 else 4
        ups = [
            ClientUpdate(u.client_id, u.weight, make_factors(shapes, rank, rnd.dtype, gen))
            for u in rnd.updates
        ]
        return kind, Round(shapes, rank, rnd.dtype, ups)
    transform = DEGENERATE[kind]
    ups = []
    for u in rnd.updates:
        touched = draw(st.booleans()) or kind == "all_zero"
        fs = {m: transform(f, gen) if touched else f for m, f in u.factors.items()}
        ups.append(ClientUpdate(u.client_id, u.weight, fs))
    if kind != "all_zero":  # make sure at least the first client is degenerate
        ups[0] = ClientUpdate(
            ups[0].client_id,
            ups[0].weight,
            {m: transform(f, gen) for m, f in rnd.updates[0].factors.items()},
        )
    return kind, Round(rnd.shapes, rnd.rank, rnd.dtype, ups)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, database=None)
@given(data=st.data())
def test_degenerate_valid_rounds_are_finite_and_exact(name: str, data: st.DataObject) -> None:
    """All-zero / rank-deficient / rank > min(d, k) rounds: finite; exact rules are exact."""
    kind, rnd = data.draw(degenerate_rounds(), label="degenerate")
    agg = build(name, **EXACT_OPTIONS.get(name, {}))
    agg.aggregate(rnd.updates)
    assert_finite_everywhere(agg, rnd.rank)
    if name in EXACT_OPTIONS:
        assert_close(global_products(name, agg), dense_oracle(rnd.updates), rnd.dtype)
    if kind == "all_zero" and name not in ("ffa", "fedsa", "rolora"):
        # keep-a-factor rules (ffa, fedsa, rolora) keep a non-zero A or B; the product is 0 anyway
        for m, g in global_products(name, agg).items():
            assert float(g.abs().max()) == 0.0, m
    EXAMPLES[f"degenerate/{name}"] += 1


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, database=None)
@given(rnd=valid_rounds())
def test_single_client_gets_its_own_update_back(name: str, rnd: Round) -> None:
    """With one client, exact rules (and plain averages) return that client's update."""
    one = rnd.updates[:1]
    agg = build(name, **EXACT_OPTIONS.get(name, {}))
    agg.aggregate(one)
    assert_finite_everywhere(agg, rnd.rank)
    if name in OWN_UPDATE_BACK:
        want = {m: f.B.double() @ f.A.double() for m, f in one[0].factors.items()}
        loose = name not in EXACT_OPTIONS  # florana/lorafair stop at a tolerance
        assert_close(global_products(name, agg), want, rnd.dtype, loose=loose)
    EXAMPLES[f"single/{name}"] += 1


def test_numpy_scalar_and_int_weights_are_accepted() -> None:
    """Real numbers of any kind are valid weights (bool is not)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"m": (4, 3)}
    ups = [
        ClientUpdate("a", np.float32(2.0), make_factors(shapes, 2, torch.float64, gen)),  # type: ignore[arg-type]
        ClientUpdate("b", 3, make_factors(shapes, 2, torch.float64, gen)),
    ]
    agg = build("glora", server_rank=64)
    agg.aggregate(ups)
    assert_close(global_products("glora", agg), dense_oracle(ups), torch.float64)


def test_zz_example_count() -> None:
    """The malformed-update fuzzing really ran ≥ 200 examples (when the whole file ran)."""
    ran = {k: v for k, v in EXAMPLES.items() if k.startswith("malformed/")}
    if len(ran) < len(NAMES):
        pytest.skip(f"only {len(ran)} of {len(NAMES)} rules were fuzzed in this run: {ran}")
    total = sum(ran.values())
    kinds = {k: v for k, v in EXAMPLES.items() if k.startswith("kind/")}
    print(f"\nfuzz examples: malformed={total} per rule={ran} kinds={len(kinds)}")
    print(
        f"degenerate={sum(v for k, v in EXAMPLES.items() if k.startswith('degenerate/'))} "
        f"single={sum(v for k, v in EXAMPLES.items() if k.startswith('single/'))}"
    )
    assert total >= 200, ran
    assert len(kinds) >= 25, sorted(kinds)
