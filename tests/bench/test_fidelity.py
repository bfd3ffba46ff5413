"""Aggregation fidelity bench: exactness and gauge (in)variance facts of the rules."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from glora.bench import fidelity as fid
from tests.helpers import oracle, random_updates

SHAPES = {"q": (12, 10), "v": (10, 14)}
EXACT = {"glora (R=Σr)", "flexlora", "flora", "fedex", "ffa", "rolora"}
INVARIANT = {"glora", "glora (R=Σr)", "flexlora", "flora", "fedex"}
SHARED_FACTOR = {"ffa", "rolora"}


@pytest.fixture(scope="module")
def rows() -> list[fid.FidelityRow]:
    scenarios = [
        fid.random_scenario("hom", [4, 4, 4], SHAPES, seed=0),
        fid.random_scenario("het", [2, 4, 8, 3], SHAPES, seed=1),
    ]
    return fid.run_fidelity(scenarios)


def _row(rows, scenario, label):
    (row,) = [r for r in rows if r.scenario == scenario and r.label == label]
    return row


@pytest.mark.parametrize("scenario", ["hom", "het"])
@pytest.mark.parametrize("label", sorted(EXACT))
def test_exact_rules(rows, scenario, label):
    row = _row(rows, scenario, label)
    assert row.error is not None and row.error <= 1e-9, row


@pytest.mark.parametrize("scenario", ["hom", "het"])
@pytest.mark.parametrize("label", sorted(INVARIANT))
def test_gauge_invariant_rules(rows, scenario, label):
    row = _row(rows, scenario, label)
    assert row.gauge_orthogonal is not None and row.gauge_orthogonal <= 1e-9, row
    assert row.gauge_general is not None and row.gauge_general <= 1e-9, row


@pytest.mark.parametrize("scenario", ["hom", "het"])
def test_fedit_changes_under_gauges_and_is_inexact(rows, scenario):
    row = _row(rows, scenario, "fedit")
    assert row.error > 1e-3
    assert row.gauge_orthogonal > 1e-2 and row.gauge_general > 1e-2


@pytest.mark.parametrize("label", sorted(SHARED_FACTOR))
def test_shared_factor_rules_report_gauge_na(rows, label):
    row = _row(rows, "het", label)
    assert row.gauge_orthogonal is None and row.gauge_general is None
    assert "n/a" in row.note and row.padded


def test_glora_default_rank_is_invariant_but_projects(rows):
    row = _row(rows, "het", "glora")
    assert row.error > 1e-3  # R = r_max < Σ r: the average is projected onto the consensus
    assert not row.padded


def test_hard_fedrot_removes_rotations_only(rows):
    row = _row(rows, "hom", "fedrot (λ=1)")
    assert row.gauge_orthogonal <= 1e-9 and row.gauge_general > 1e-3


def test_same_rank_rules_are_padded_and_labelled(rows):
    row = _row(rows, "het", "fedit")
    assert row.padded and "zero-padded" in row.note


def test_gauge_keeps_products():
    ups = random_updates([3, 5], SHAPES)
    for orth in (True, False):
        g = fid.apply_gauge(ups, seed=3, orthogonal=orth)
        for u, v in zip(ups, g):
            for m in u.factors:
                assert torch.allclose(u.factors[m].delta(), v.factors[m].delta(), atol=1e-12)
                assert not torch.allclose(u.factors[m].A, v.factors[m].A)


def test_exact_average_matches_oracle():
    ups = random_updates([2, 3], SHAPES)
    ex, orc = fid.exact_average(ups), oracle(ups)
    assert all(torch.allclose(ex[m], orc[m]) for m in orc)


def test_save_load_roundtrip_and_real_updates_scenario(tmp_path):
    ups = random_updates([2, 4], SHAPES)
    ups[0] = fid.ClientUpdate(
        ups[0].client_id, ups[0].weight, ups[0].factors, {"head.w": torch.ones(3)}
    )
    ref = {m: f.pad(4) for m, f in ups[1].factors.items()}
    fid.save_updates(ups, tmp_path / "r1", reference=ref, meta={"round": 1})
    back = fid.load_updates(tmp_path / "r1")
    assert [u.client_id for u in back] == ["c0", "c1"] and [u.weight for u in back] == [1.0, 2.0]
    for u, v in zip(ups, back):
        for m in u.factors:
            assert torch.equal(u.factors[m].A, v.factors[m].A)
            assert torch.equal(u.factors[m].B, v.factors[m].B)
    assert torch.equal(back[0].extra["head.w"], torch.ones(3))
    assert fid.load_reference(tmp_path / "r1") is not None
    scen = fid.updates_scenario(tmp_path / "r1")
    got = fid.run_fidelity([scen], [fid.Variant("flora", "flora"), fid.Variant("ffa", "ffa")])
    assert got[0].error <= 1e-9 and got[0].gauge_general <= 1e-9
    # these clients do not share a frozen A: FFA is reported as not applicable
    assert got[1].error is None and "n/a" in got[1].note


def test_cli_json(tmp_path):
    import typer

    from glora.cli.bench_fidelity import register

    app = typer.Typer()
    register(app, standalone=True)
    res = CliRunner().invoke(
        app,
        [
            "--homogeneous",
            "3x2",
            "--heterogeneous",
            "",
            "--shapes",
            "8x6",
            "--methods",
            "fedit,glora",
            "--json",
            "--out",
            str(tmp_path / "f.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {d["method"] for d in data} == {"fedit", "glora"}
    assert json.loads((tmp_path / "f.json").read_text()) == data


def test_capture_updates_saves_what_the_aggregator_receives(tmp_path):
    from glora.config import validate_config
    from glora.sim.engine import Simulation
    from tests.sim.conftest import tiny_raw, write_glue

    glue = write_glue(tmp_path / "glue", n_train=32, n_dev=16)
    cfg = validate_config(tiny_raw(glue, tmp_path / "out", training={"rounds": 2}))
    sim = Simulation(cfg)
    received: dict[int, list] = {}
    starts: dict[int, dict] = {}
    real = sim.agg.aggregate

    def aggregate(updates):
        received[sim.state.round + 1] = list(updates)
        starts[sim.state.round + 1] = sim.agg.readout(sim.state, 4)
        return real(updates)

    sim.agg.aggregate = aggregate  # type: ignore[method-assign]
    fid.capture_updates(sim, tmp_path / "updates", rounds=[2])
    sim.run()
    assert [p.name for p in (tmp_path / "updates").iterdir()] == ["round_0002"]
    back = fid.load_updates(tmp_path / "updates" / "round_0002")
    assert [(u.client_id, u.weight) for u in back] == [(u.client_id, u.weight) for u in received[2]]
    for u, v in zip(received[2], back):
        for m in u.factors:
            assert torch.equal(u.factors[m].A, v.factors[m].A)
            assert torch.equal(u.factors[m].B, v.factors[m].B)
    ref = fid.load_reference(tmp_path / "updates" / "round_0002")
    meta = json.loads((tmp_path / "updates" / "round_0002" / "clients.json").read_text())["meta"]
    assert meta == {"round": 2, "method": "glora", "seed": 0}
    assert ref is not None and set(ref) == set(starts[2])
    for m, f in starts[2].items():
        assert torch.equal(ref[m].A, f.A) and torch.equal(ref[m].B, f.B)
    assert fid.updates_scenario(tmp_path / "updates" / "round_0002").updates
