"""The server-aggregation benchmark on a tiny shape: report structure only, no timing checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from glora.bench import aggregation as bench
from glora.cli import app

TINY = {"modules": 3, "d": 24, "k": 20, "clients": 4, "ranks": (2, 4), "repeats": 2}


def test_make_updates_is_seeded_and_prefix_stable() -> None:
    ranks = bench.client_ranks(5, (2, 4, 8), seed=3)
    assert ranks == bench.client_ranks(5, (2, 4, 8), seed=3)
    assert set(ranks) <= {2, 4, 8}
    full = bench.make_updates(modules=3, d=10, k=9, ranks=ranks, seed=1)
    fewer = bench.make_updates(modules=1, d=10, k=9, ranks=ranks, seed=1)
    assert [u.client_id for u in full] == [u.client_id for u in fewer]
    for u_full, u_few in zip(full, fewer):
        (name,) = u_few.factors
        assert torch.equal(u_full.factors[name].A, u_few.factors[name].A)
        assert torch.equal(u_full.factors[name].B, u_few.factors[name].B)
        assert u_full.factors[name].B.abs().sum() > 0
        assert u_full.factors[name].A.dtype == torch.float32
        assert u_full.weight == u_few.weight
    expected = sum(3 * r * (10 + 9) * 4 for r in ranks)
    assert bench.factor_bytes(full) == expected


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="modules"):
        bench.BenchConfig(modules=0)
    with pytest.raises(ValueError, match="dtype"):
        bench.BenchConfig(dtype="float16")
    with pytest.raises(ValueError, match="rank"):
        bench.BenchConfig(d=8, k=8, ranks=(16,))
    cfg = bench.BenchConfig(modules=10, flexlora_modules=2)
    assert cfg.modules_for("flexlora") == 2
    assert cfg.modules_for("glora") == 10
    assert "--flexlora-modules 2" in bench.equivalent_command(cfg)


def test_evaluate_targets_verdicts() -> None:
    rows = [
        {"method": "glora", "status": "ok", "round_s": 2.0, "per_module_ms": 1.0,
         "peak_extra_bytes": 50, "client_factor_bytes": 100},
        {"method": "fedit", "status": "ok", "round_s": 1.0, "per_module_ms": 0.5},
        {"method": "flexlora", "status": "ok", "round_s": 9.0, "per_module_ms": 50.0},
    ]  # fmt: skip
    verdicts = [t["verdict"] for t in bench.evaluate_targets(rows)]
    assert verdicts == ["PASS", "FAIL", "PASS"]
    rows[2]["status"] = "not available"
    targets = bench.evaluate_targets(rows)
    assert targets[1]["verdict"] == "n/a" and targets[1]["ratio"] is None


def test_run_benchmark_report_structure() -> None:
    config = bench.BenchConfig(
        **TINY,
        methods=("glora", "fedit", "flexlora", "no-such-method"),
        flexlora_modules=1,
        threads=1,
    )
    messages: list[str] = []
    report = bench.run_benchmark(config, command="test", progress=messages.append)
    assert report["command"] == "test"
    assert report["equivalent_command"].startswith("glora bench aggregation --modules 3")
    assert len(report["client_ranks"]) == 4
    assert report["environment"]["threads"] == 1
    by_method = {r["method"]: r for r in report["results"]}
    assert list(by_method) == ["glora", "fedit", "flexlora", "no-such-method"]
    assert by_method["no-such-method"]["status"] == "not available"
    for name in ("glora", "fedit", "flexlora"):
        row = by_method[name]
        assert row["status"] == "ok", row
        assert len(row["times_s"]) == 2
        assert row["round_s"] > 0
        assert row["peak_extra_bytes"] >= 0
        assert row["client_factor_bytes"] > 0
        assert math.isclose(row["per_module_ms"], 1000 * row["round_s"] / row["modules"])
        assert row["threads"] == 1
    assert by_method["glora"]["pad"] is False
    assert by_method["fedit"]["pad"] is True
    assert by_method["flexlora"]["modules"] == 1
    assert by_method["glora"]["modules"] == 3
    assert [t["verdict"] in ("PASS", "FAIL") for t in report["targets"]] == [True] * 3
    json.dumps(report)  # JSON-able
    assert "| glora | native | 3 |" in bench.markdown_table(report)
    assert any("not available" in m for m in messages)


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    args = ["bench", "aggregation", "--modules", "2", "--d", "16", "--k", "12", "--clients", "3"]
    args += ["--ranks", "2,4", "--methods", "glora,missing", "--repeats", "1", "--threads", "1"]
    args += ["--set", "glora.consensus=gram", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "not available" in result.output
    assert "GLoRA round / FedIT round" in result.output
    report = json.loads(out.read_text())
    assert report["config"]["options"] == {"glora": {"consensus": "gram"}}
    assert report["results"][0]["options"] == {"consensus": "gram"}
    assert report["targets"][0]["verdict"] == "n/a"


def test_cli_rejects_bad_options() -> None:
    result = CliRunner().invoke(app, ["bench", "aggregation", "--dtype", "int8"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["bench", "aggregation", "--set", "nodot=1"])
    assert result.exit_code == 2
