"""`glora run` through typer's CliRunner on the tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from glora.cli import app
from tests.sim.conftest import tiny_raw, write_glue

runner = CliRunner()


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"), n_train=40, n_dev=16)


def _config(tmp_path: Path, glue: Path, **sections) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(tiny_raw(glue, tmp_path / "runs", **sections)))
    return p


def test_run_writes_run_dir(tmp_path: Path, glue: Path) -> None:
    cfg = _config(tmp_path, glue)
    res = runner.invoke(app, ["run", str(cfg), "--set", "training.rounds=2"])
    assert res.exit_code == 0, res.output
    assert "glora run summary" in res.output
    run_dir = tmp_path / "runs" / "tiny"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    keys = {"round", "method", "participants", "dropped", "train_loss", "metrics", "bytes_up",
            "bytes_down", "server_seconds", "diagnostics"}  # fmt: skip
    assert keys <= set(records[0])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["rounds"] == 2
    assert (run_dir / "checkpoints" / "round_0002" / "server.json").is_file()
    # a second run into the same directory is refused, then allowed with --overwrite
    res = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert res.exit_code == 2 and "already holds a run" in res.output
    res = runner.invoke(app, ["run", str(cfg), "--quiet", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == ""


def test_resume_from_cli(tmp_path: Path, glue: Path) -> None:
    cfg = _config(tmp_path, glue)
    assert runner.invoke(app, ["run", str(cfg), "--quiet"]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    res = runner.invoke(app, ["run", "--resume", str(run_dir), "--set", "training.rounds=2"])
    assert res.exit_code == 0, res.output
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    res = runner.invoke(app, ["run", "--resume", str(run_dir), "--set", "seed=4"])
    assert res.exit_code == 2 and "seed" in res.output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.roundz=3", "training.roundz: unknown key"),
        ("federation.partition=zipf", "'iid', 'dirichlet', 'quantity', 'by_task' or 'by_category'"),
        ("method.name=nope", "allowed values"),
        ("method.bogus=1", "valid options"),
        ("data.task=squad", "data.task"),
    ],
)
def test_bad_config_exit_2(tmp_path: Path, glue: Path, override: str, expected: str) -> None:
    res = runner.invoke(app, ["run", str(_config(tmp_path, glue)), "--set", override])
    assert res.exit_code == 2, res.output
    assert expected in res.output.replace("\n", " ")
    assert "Traceback" not in res.output


def test_missing_inputs_exit_2(tmp_path: Path, glue: Path) -> None:
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "not found" in res.output
    cfg = _config(tmp_path, glue, data={"dir": str(tmp_path / "no-glue")})
    res = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert res.exit_code == 2 and "data.dir" in res.output.replace("\n", " ")
    assert "Traceback" not in res.output
    cfg = _config(tmp_path, glue, model={"name": str(tmp_path / "no-model")})
    res = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert res.exit_code == 2 and "model.name" in res.output
    res = runner.invoke(app, ["run"])
    assert res.exit_code == 2 and "CONFIG" in res.output
