"""The norm-based outlier guard (``glora.robust`` and the ``norm_guard`` aggregator options)."""

from __future__ import annotations

import math

import pytest
import torch

from glora import ClientUpdate, InvalidUpdate, LoRAFactors, aggregators
from glora.aggregators.base import Aggregator
from glora.linalg import product_fro_norm_sq
from glora.robust import apply_norm_guard, update_norms
from glora.validation import validate_updates

SHAPES = {"enc.0.q": (10, 8), "enc.1.v": (6, 12)}
GUARDED = ["glora", "fedit", "flexlora"]


def make_round(
    n: int = 5, *, outlier: int | None = 2, factor: float = 10.0, seed: int = 0, rank: int = 3
) -> list[ClientUpdate]:
    """``n`` clients of similar update norms; client ``outlier`` is ``factor``× larger.

    Every client's update is a rescaled random one with norm exactly ``1 + 0.05 i`` (before
    the outlier's extra factor), so the median is well defined.
    """
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i in range(n):
        fs = {}
        for m, (d, k) in SHAPES.items():
            A = torch.randn(rank, k, generator=gen, dtype=torch.float64)
            B = torch.randn(d, rank, generator=gen, dtype=torch.float64)
            fs[m] = LoRAFactors(A=A, B=B)
        norm = math.sqrt(sum(float(product_fro_norm_sq(f.B, f.A)) for f in fs.values()))
        target = (1.0 + 0.05 * i) * (factor if i == outlier else 1.0)
        fs = {m: LoRAFactors(A=f.A, B=f.B * (target / norm)) for m, f in fs.items()}
        ups.append(ClientUpdate(f"c{i}", float(i + 1), fs))
    return ups


def dense_global(agg: Aggregator) -> dict[str, torch.Tensor]:
    assert agg.state is not None
    return {m: f.delta() for m, f in agg.effective_update(agg.state).items()}


def client_norm(u: ClientUpdate) -> float:
    return math.sqrt(sum(float((f.B @ f.A).square().sum()) for f in u.factors.values()))


# ---------------------------------------------------------------- the pure function
def test_update_norms_match_dense_products() -> None:
    ups = make_round()
    norms = update_norms(validate_updates(ups))
    assert norms.dtype == torch.float64 and norms.shape == (5,)
    for i, u in enumerate(ups):
        assert float(norms[i]) == pytest.approx(client_norm(u), rel=1e-12)


def test_reject_drops_the_outlier_and_renormalises() -> None:
    rnd = validate_updates(make_round())
    out, actions = apply_norm_guard(rnd, 3.0, "reject")
    assert set(actions) == {"c2"} and actions["c2"].startswith("rejected")
    assert out.client_ids == ("c0", "c1", "c3", "c4")
    assert float(out.weights.sum()) == pytest.approx(1.0)
    # remaining weights keep their ratios (1, 2, 4, 5)
    assert torch.allclose(out.weights, torch.tensor([1, 2, 4, 5], dtype=torch.float64) / 12)
    assert all(len(fs) == 4 for fs in out.factors.values())
    assert all(len(r) == 4 for r in out.ranks.values()) and len(out.extra) == 4
    assert rnd.n == 5  # the input round is untouched


def test_clip_scales_the_outlier_to_the_threshold() -> None:
    ups = make_round()
    rnd = validate_updates(ups)
    median = float(update_norms(rnd).median())
    out, actions = apply_norm_guard(rnd, 3.0, "clip")
    assert set(actions) == {"c2"} and actions["c2"].startswith("clipped")
    assert out.client_ids == rnd.client_ids and torch.equal(out.weights, rnd.weights)
    norms = update_norms(out)
    assert float(norms[2]) == pytest.approx(3.0 * median, rel=1e-9)
    for i in (0, 1, 3, 4):
        assert float(norms[i]) == pytest.approx(client_norm(ups[i]), rel=1e-12)
        for m in rnd.modules:  # other clients are passed through as they are
            assert out.factors[m][i] is rnd.factors[m][i]
    for m in rnd.modules:  # clipping scales B only, and never in place
        assert out.factors[m][2].A is rnd.factors[m][2].A
        assert torch.equal(rnd.factors[m][2].B, ups[2].factors[m].B)


def test_nothing_happens_without_an_outlier_or_with_one_client() -> None:
    rnd = validate_updates(make_round(outlier=None))
    for mode in ("reject", "clip"):
        out, actions = apply_norm_guard(rnd, 2.0, mode)  # type: ignore[arg-type]
        assert out is rnd and actions == {}
    one = validate_updates(make_round(1, outlier=None))
    assert apply_norm_guard(one, 1.0, "reject") == (one, {})


def test_never_rejects_everyone_and_handles_zero_median() -> None:
    # two clients, the larger one is an outlier of the median (mean of the two): only it goes
    rnd = validate_updates(make_round(2, outlier=1, factor=100.0))
    out, actions = apply_norm_guard(rnd, 1.0, "reject")
    assert out.client_ids == ("c0",) and set(actions) == {"c1"}
    # all-zero majority: median 0 → the guard stands aside instead of rejecting every non-zero
    zeros = make_round(3, outlier=None)
    zeros = [
        ClientUpdate(
            u.client_id, u.weight, {m: LoRAFactors(f.A, f.B * 0) for m, f in u.factors.items()}
        )
        if i < 2
        else u
        for i, u in enumerate(zeros)
    ]
    rnd0 = validate_updates(zeros)
    assert apply_norm_guard(rnd0, 1.0, "reject") == (rnd0, {})


@pytest.mark.parametrize(
    ("multiple", "mode", "option"),
    [
        (0.5, "reject", "norm_guard"),
        (-1.0, "reject", "norm_guard"),
        (math.nan, "clip", "norm_guard"),
        (math.inf, "clip", "norm_guard"),
        (True, "clip", "norm_guard"),
        ("3", "clip", "norm_guard"),
        (None, "reject", "norm_guard"),
        (3.0, "drop", "norm_guard_mode"),
        (3.0, None, "norm_guard_mode"),
    ],
)
def test_bad_guard_options_raise_value_error_naming_the_option(
    multiple: object, mode: object, option: str
) -> None:
    rnd = validate_updates(make_round())
    with pytest.raises(ValueError, match=option):
        apply_norm_guard(rnd, multiple, mode)  # type: ignore[arg-type]
    if multiple is not None:  # None is the valid "off" value of the constructor option
        with pytest.raises(ValueError, match=option):
            aggregators.build("fedit", norm_guard=multiple, norm_guard_mode=mode)


# ---------------------------------------------------------------- through the aggregators
def test_guard_options_are_registered_keyword_options() -> None:
    for name in aggregators.available():
        cls = aggregators.get_class(name)
        assert {"norm_guard", "norm_guard_mode"} <= set(cls.option_names()), name
    agg = aggregators.build("glora", norm_guard=3, norm_guard_mode="clip")
    assert agg.options()["norm_guard"] == 3.0 and agg.options()["norm_guard_mode"] == "clip"
    again = aggregators.build("glora", **agg.options())
    assert again.options() == agg.options()
    default = aggregators.build("fedit")
    assert default.norm_guard is None and default.norm_guard_mode == "reject"


@pytest.mark.parametrize("name", GUARDED)
def test_off_by_default_changes_nothing(name: str) -> None:
    ups = make_round()
    plain = aggregators.build(name)
    plain.aggregate(ups)
    assert plain.state is not None and "norm_guard" not in plain.state.diagnostics
    ref = aggregators.build(name)
    ref.aggregate(ups)
    for m, t in dense_global(plain).items():
        assert torch.equal(t, dense_global(ref)[m])


@pytest.mark.parametrize("name", GUARDED)
def test_reject_equals_aggregating_without_the_outlier(name: str) -> None:
    ups = make_round()
    guarded = aggregators.build(name, norm_guard=3.0)
    state = guarded.aggregate(ups)
    diag = state.diagnostics["norm_guard"]
    assert diag["mode"] == "reject" and diag["clients"] == 5 and diag["kept"] == 4
    assert set(diag["actions"]) == {"c2"}
    ref = aggregators.build(name)
    ref.aggregate([u for u in ups if u.client_id != "c2"])
    for m, t in dense_global(guarded).items():
        assert torch.allclose(t, dense_global(ref)[m], atol=1e-12)
    # the unguarded result differs (the outlier dominates)
    plain = aggregators.build(name)
    plain.aggregate(ups)
    assert any(
        not torch.allclose(t, dense_global(plain)[m], atol=1e-6)
        for m, t in dense_global(guarded).items()
    )


@pytest.mark.parametrize("name", GUARDED)
def test_clip_equals_aggregating_the_clipped_update(name: str) -> None:
    ups = make_round()
    guarded = aggregators.build(name, norm_guard=3.0, norm_guard_mode="clip")
    state = guarded.aggregate(ups)
    diag = state.diagnostics["norm_guard"]
    assert diag["mode"] == "clip" and diag["kept"] == 5 and set(diag["actions"]) == {"c2"}
    median = sorted(client_norm(u) for u in ups)[2]
    scale = 3.0 * median / client_norm(ups[2])
    clipped = list(ups)
    clipped[2] = ClientUpdate(
        "c2",
        ups[2].weight,
        {m: LoRAFactors(f.A, f.B * scale) for m, f in ups[2].factors.items()},
    )
    ref = aggregators.build(name)
    ref.aggregate(clipped)
    for m, t in dense_global(guarded).items():
        assert torch.allclose(t, dense_global(ref)[m], atol=1e-10)


@pytest.mark.parametrize("name", aggregators.available())
def test_guard_works_with_every_aggregator(name: str) -> None:
    for mode in ("reject", "clip"):
        agg = aggregators.build(name, norm_guard=2.0, norm_guard_mode=mode)
        state = agg.aggregate(make_round())
        assert set(state.diagnostics["norm_guard"]["actions"]) == {"c2"}
        state = agg.aggregate(make_round(outlier=None, seed=1))
        assert state.round == 2 and state.diagnostics["norm_guard"]["actions"] == {}


def test_guard_runs_after_validation() -> None:
    ups = make_round()
    bad = list(ups)
    f = ups[2].factors["enc.0.q"]
    bad[2] = ClientUpdate(
        "c2", 1.0, {**ups[2].factors, "enc.0.q": LoRAFactors(f.A, f.B * math.nan)}
    )
    agg = aggregators.build("glora", norm_guard=3.0)
    with pytest.raises(InvalidUpdate, match="'c2'"):
        agg.aggregate(bad)
    assert agg.state is None
