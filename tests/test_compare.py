"""`glora compare` on the tiny model: report files, unsupported settings, resume."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from glora.compare import MethodSpec, parse_methods, run_compare, write_report

# the project's shared data next to the checkout (CI clones with ../shared beside it)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

BASE = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "tiny-bert", "max_length": 32},
    "data": {"task": "sst2", "dir": str(DATA), "max_train_examples": 48, "max_eval_examples": 24},
    "federation": {"clients": 2, "partition": "iid", "ranks": [2, 4], "participation": 1.0},
    "method": {"name": "glora"},
    "training": {"rounds": 2, "local_steps": 1, "batch_size": 8, "device": "cpu", "num_threads": 1},
}


def _require_data() -> None:
    assert (DATA / "SST-2").is_dir(), f"GLUE data missing: expected {DATA} (see its README)"


def _write_rounds(config, records: list[dict]) -> None:
    """What a run leaves in its directory, without training: ``config.yaml`` (kept when already
    there, as the simulator keeps it on a resume) and ``records`` appended to ``metrics.jsonl``."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    if not (config.run_dir / "config.yaml").exists():
        (config.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_yaml_dict()))
    with (config.run_dir / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in records))


def test_parse_methods_with_options():
    specs = parse_methods("glora,fedit,glora[server_rank=32;energy=0.95]")
    assert [s.name for s in specs] == ["glora", "fedit", "glora"]
    assert specs[2].options == {"server_rank": 32, "energy": 0.95}
    assert specs[2].slug.startswith("glora")
    with pytest.raises(ValueError):
        parse_methods("glora,glora")


def test_compare_tiny_report_and_resume(tmp_path):
    _require_data()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "report"
    outcomes = run_compare(cfg, "glora,fedit", [0, 1], out, log=None)
    status = {(o.label, o.seed): o.status for o in outcomes}
    assert status == {
        ("glora", 0): "done",
        ("glora", 1): "done",
        ("fedit", 0): "unsupported",
        ("fedit", 1): "unsupported",
    }
    for name in (
        "table.csv",
        "table.md",
        "cost.csv",
        "cost.md",
        "report.md",
        "status.json",
        "per_seed.csv",
        "paired.csv",
    ):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_round.png").stat().st_size > 1000
    assert (out / "train_loss_vs_round.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "glora" in report and "fedit" in report and "one LoRA rank" in report
    assert " ± " in (out / "table.md").read_text()
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").read_text().splitlines())}
    assert rows["glora"]["seeds_done"] == "2" and rows["fedit"]["status"] == "unsupported"
    assert float(rows["glora"]["bytes_up_per_round"]) > 0

    # a finished grid without --resume is refused; with it, finished runs are skipped
    with pytest.raises(FileExistsError):
        run_compare(cfg, "glora", [0], out, log=None)
    calls: list[tuple[str, bool]] = []

    def spy(config, resume):
        calls.append((config.name, resume))
        from glora.compare import default_runner

        return default_runner(config, resume)

    # interrupt glora seed 1 after round 1: drop round 2 from its log and checkpoints
    run1 = out / "runs" / "glora-seed1"
    lines = (run1 / "metrics.jsonl").read_text().splitlines()
    (run1 / "metrics.jsonl").write_text(lines[0] + "\n")
    shutil.rmtree(run1 / "checkpoints" / "round_0002")
    logs: list[str] = []
    outcomes = run_compare(
        cfg, "glora,fedit", [0, 1], out, resume=True, pad=True, runner=spy, log=logs.append
    )
    # glora seed 0 skipped, seed 1 resumed; fedit now runs with zero-padding
    assert ("glora-seed1", True) in calls and all(n != "glora-seed0" for n, _ in calls)
    assert ("fedit_zero-pad-seed0", False) in calls
    assert all(o.status == "done" for o in outcomes)
    recs = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    table = (out / "table.md").read_text()
    assert "fedit (zero-pad)" in table and "zero-padding" in table
    write_report(out)  # report-only rewrite from status.json
    assert "fedit (zero-pad)" in (out / "report.md").read_text()

    # --resume never reuses a run of another config (here another lr): refused before any run,
    # naming the run and the changed key; keys a resume may change (eval cadence) are accepted
    calls.clear()
    before = (out / "status.json").read_text()
    with pytest.raises(ValueError, match=r"(?s)glora seed 0.*training\.lr.*another output"):
        run_compare(
            cfg, "glora", [0, 1], out, resume=True, overrides=["training.lr=0.5"], runner=spy
        )
    assert calls == [] and (out / "status.json").read_text() == before
    outcomes = run_compare(
        cfg, "glora", [0], out, resume=True, overrides=["training.eval_every=2"], runner=spy
    )
    assert calls == [] and [o.status for o in outcomes] == ["done"]


def test_cli_compare_lists_unsupported(tmp_path):
    _require_data()
    import typer

    from glora.cli.compare import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep `compare` as a named sub-command
        pass

    cfg = tmp_path / "tiny.yaml"
    base = dict(BASE, training={**BASE["training"], "rounds": 1})
    cfg.write_text(yaml.safe_dump(base))
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(cfg),
            "--methods",
            "fedit,ffa",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "0/2 runs done" in res.output
    assert "unsupported" in (tmp_path / "o" / "table.md").read_text()


def test_method_spec_label():
    assert MethodSpec("fedit (zero-pad)", "fedit", padded=True).slug == "fedit_zero-pad"


def test_report_reads_runs_kept_outside_the_report_dir(tmp_path, monkeypatch):
    """Runs under another directory (as scripts/experiments.py keeps them) still fill the table."""
    _require_data()
    monkeypatch.chdir(tmp_path)  # a run directory given relative to the current directory
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out = tmp_path / "docs" / "report"
    run_compare(cfg, "glora", [0], out, log=None, runs_dir="runs/elsewhere")
    assert (tmp_path / "runs" / "elsewhere").is_dir()
    row = next(csv.DictReader((out / "table.csv").open()))
    assert 0.0 <= float(row["final_mean"]) <= 1.0
    write_report(out)  # rebuilt from status.json alone
    row = next(csv.DictReader((out / "table.csv").open()))
    assert 0.0 <= float(row["final_mean"]) <= 1.0

    # with the run directory and the kept records gone, a rebuild is refused and writes nothing
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(out / "records")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"records/<run>\.json\): glora seed 0 .*--resume"):
        write_report(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_an_emptied_metrics_file_falls_back_to_the_kept_records(tmp_path):
    """A finished run whose ``metrics.jsonl`` was emptied later is reported from ``records/``."""
    _require_data()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs)
    before = (out / "table.csv").read_text()
    (runs / "glora-seed0" / "metrics.jsonl").write_text("")
    write_report(out)
    assert (out / "table.csv").read_text() == before


def test_kept_records_let_a_comparison_grow_without_its_run_directories(tmp_path):
    """A fresh clone has the committed report (with ``records/``) but not the runs: the finished
    runs are reused from the records, only new methods run, and the table is unchanged."""
    _require_data()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs)
    kept = json.loads((out / "records" / "glora-seed0.json").read_text())
    metrics = [
        json.loads(x) for x in (runs / "glora-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert kept["config"]["method"]["name"] == "glora" and kept["config"]["seed"] == 0
    assert "diagnostics" in metrics[0] and "diagnostics" not in kept["records"][0]
    assert kept["records"] == [{k: v for k, v in metrics[0].items() if k != "diagnostics"}]
    before = next(csv.DictReader((out / "table.csv").open()))

    shutil.rmtree(runs)  # the large run directories are not committed
    calls: list[str] = []

    def spy(config, resume):
        calls.append(config.name)
        from glora.compare import default_runner

        return default_runner(config, resume)

    with pytest.raises(FileExistsError, match=r"records/glora-seed0\.json.*resume"):
        run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs, runner=spy)
    logs: list[str] = []
    outcomes = run_compare(
        cfg, "glora,flexlora", [0], out, resume=True, log=logs.append, runs_dir=runs, runner=spy
    )
    assert calls == ["flexlora-seed0"] and [o.status for o in outcomes] == ["done", "done"]
    assert any("glora seed 0] finished earlier (kept in records/)" in m for m in logs)
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert rows["glora"]["final_mean"] == before["final_mean"]
    assert (out / "records" / "flexlora-seed0.json").is_file()
    write_report(out)  # report-only rebuild reads the kept records too
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert rows["glora"]["final_mean"] == before["final_mean"]

    def resume_glora(override: str) -> list:
        """Resume the kept glora run under one config override."""
        return run_compare(
            cfg,
            "glora",
            [0],
            out,
            resume=True,
            runs_dir=runs,
            runner=spy,
            log=None,
            overrides=[override],
        )

    # a kept run of another configuration is refused, naming it and the key, before any run
    calls.clear()
    with pytest.raises(ValueError, match=r"(?s)glora seed 0.*records/glora-seed0.*training\.lr"):
        resume_glora("training.lr=0.5")
    assert calls == []
    # more rounds than kept: the run is redone (the kept records reach only round 1)
    outcomes = resume_glora("training.rounds=2")
    assert calls == ["glora-seed0"] and outcomes[0].status == "done"
    kept = json.loads((out / "records" / "glora-seed0.json").read_text())
    assert [r["round"] for r in kept["records"]] == [1, 2]


def test_a_run_started_afresh_does_not_add_the_previous_runs_wall_time(tmp_path):
    """status.json keeps a finished run's wall time; when that run is run again from scratch
    (its directory gone, no kept records) the new time replaces it instead of adding to it."""
    _require_data()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs)
    status = json.loads((out / "status.json").read_text())
    status["runs"][0]["wall_seconds"] = 1e6  # a previous session's time, far above this run's
    (out / "status.json").write_text(json.dumps(status))
    shutil.rmtree(runs)
    shutil.rmtree(out / "records")
    (outcome,) = run_compare(cfg, "glora", [0], out, resume=True, log=None, runs_dir=runs)
    assert outcome.status == "done" and 0 < outcome.wall_seconds < 1e5


def test_a_resumed_run_keeps_the_recorded_wall_time_of_a_killed_process(tmp_path):
    """A process killed mid-run never saves that run's wall time to status.json; resuming it
    counts the wall time of the rounds its run directory recorded, and status.json's time when
    that is larger."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 3}}))
    out, runs = tmp_path / "report", tmp_path / "runs"

    def cut(config, resume):
        """Write rounds 1-2 (30 s and 40 s), as a run killed during round 3 leaves them."""
        _write_rounds(
            config,
            [{"round": r, "metrics": {}, "wall_seconds": w} for r, w in ((1, 30.0), (2, 40.0))],
        )
        raise KeyboardInterrupt  # the kill: run_compare saves nothing for this run

    def finish(config, resume):
        """Resume: append round 3 (0.5 s)."""
        assert resume
        _write_rounds(config, [{"round": 3, "metrics": {"accuracy": 0.5}, "wall_seconds": 0.5}])

    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs, runner=cut)
    assert not (out / "status.json").exists()
    (o,) = run_compare(cfg, "glora", [0], out, resume=True, log=None, runs_dir=runs, runner=finish)
    assert o.status == "done" and 70.0 <= o.wall_seconds < 70.0 + 30.0

    # status.json holds more (an earlier call's time, beyond the recorded rounds): it wins
    status = json.loads((out / "status.json").read_text())
    status["runs"][0]["wall_seconds"] = 500.0
    (out / "status.json").write_text(json.dumps(status))
    run_dir = runs / "glora-seed0"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (o,) = run_compare(cfg, "glora", [0], out, resume=True, log=None, runs_dir=runs, runner=finish)
    assert o.status == "done" and 500.0 <= o.wall_seconds < 500.0 + 30.0


def test_a_finished_run_without_its_records_is_run_again_and_says_why(tmp_path):
    """status.json copied into a report directory without records/ (the run directory gone):
    the run is run again, and the log says that status.json called it finished."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    calls: list[str] = []

    def fake(config, resume):
        calls.append(config.name)
        _write_rounds(config, [{"round": 1, "metrics": {"accuracy": 0.5}, "wall_seconds": 1.0}])

    run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs, runner=fake)
    shutil.rmtree(runs)
    shutil.rmtree(out / "records")
    logs: list[str] = []
    (o,) = run_compare(
        cfg, "glora", [0], out, resume=True, log=logs.append, runs_dir=runs, runner=fake
    )
    assert calls == ["glora-seed0", "glora-seed0"] and o.status == "done"
    (line,) = [m for m in logs if "glora seed 0] running" in m]
    assert "status.json lists it as finished" in line and "records/glora-seed0.json" in line

    logs.clear()  # a run status.json does not call finished is run without that remark
    run_compare(
        cfg, "glora,fedit", [1], out, resume=True, log=logs.append, runs_dir=runs, runner=fake
    )
    assert not any("lists it as finished" in m for m in logs)


def test_report_counts_single_class_runs_and_evaluations(tmp_path):
    """Runs whose evaluations give ≥ 99 % of the examples one class are counted in the report:
    their accuracy is a class's share, not something learned."""
    from glora.compare import RunOutcome

    shares = {("glora", 0): [1.0, 1.0], ("glora", 1): [0.7, 0.995], ("fedit", 0): [0.6, 0.6]}
    outcomes = []
    for (label, seed), ss in shares.items():
        run = tmp_path / "runs" / f"{label}-seed{seed}"
        run.mkdir(parents=True)
        lines = [
            json.dumps({"round": i + 1, "metrics": {"accuracy": 0.5, "top_prediction_share": v}})
            for i, v in enumerate(ss)
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        outcomes.append(RunOutcome(label, label, seed, "done", run_dir=f"runs/{run.name}"))
    write_report(tmp_path, outcomes, base={"data": {"task": "sst2"}}, metric="accuracy")
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert (rows["glora"]["one_class_finals"], rows["glora"]["one_class_evals"]) == ("2", "3")
    assert rows["glora"]["evals_with_share"] == "4"
    assert (rows["fedit"]["one_class_finals"], rows["fedit"]["one_class_evals"]) == ("0", "0")
    report = (tmp_path / "report.md").read_text()
    assert "## Single-class predictions" in report
    assert "| glora | 2/2 | 3/4 |" in report and "| fedit | 0/1 | 0/2 |" in report
    per_seed = list(csv.DictReader((tmp_path / "per_seed.csv").open()))
    assert [float(r["final_top_share"]) for r in per_seed] == [1.0, 0.995, 0.6]
    # records without the key (older runs, regression tasks): no section, empty cells
    for o in outcomes:
        (tmp_path / o.run_dir / "metrics.jsonl").write_text(
            json.dumps({"round": 1, "metrics": {"accuracy": 0.5}}) + "\n"
        )
    write_report(tmp_path, outcomes, base={"data": {"task": "sst2"}}, metric="accuracy")
    assert "Single-class" not in (tmp_path / "report.md").read_text()
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "table.csv").open())}
    assert rows["glora"]["one_class_finals"] == ""


def test_paired_differences_pair_by_seed():
    from glora.compare import paired_differences

    finals = {
        "glora": {0: 0.70, 1: 0.60, 2: 0.80},
        "fedit": {0: 0.75, 1: 0.50, 2: 0.90},
        "x": {5: 1},
    }
    rows = {r["method"]: r for r in paired_differences(finals, "glora")}
    assert set(rows) == {"fedit", "x"}
    f = rows["fedit"]
    assert f["seeds"] == 3 and f["better"] == 2
    assert f["diff_mean"] == pytest.approx((0.05 - 0.10 + 0.10) / 3)
    assert f["diff_std"] == pytest.approx(statistics.stdev([0.05, -0.10, 0.10]))
    # two-sided paired t-test with 2 degrees of freedom: p = 1 − |t| / √(2 + t²)
    t = f["diff_mean"] / (f["diff_std"] / math.sqrt(3))
    assert f["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    assert rows["x"]["seeds"] == 0 and math.isnan(rows["x"]["diff_mean"])
    assert math.isnan(rows["x"]["p_value"])
    low = paired_differences(finals, "glora", higher_is_better=False)
    assert next(r for r in low if r["method"] == "fedit")["better"] == 1


def test_report_per_seed_and_paired_from_run_records(tmp_path):
    """The report reads each run's metrics.jsonl: per-seed finals/bests/curves and the paired
    differences against the reference are computed from them exactly."""
    from glora.compare import RunOutcome

    series = {
        ("glora", 0): [0.5, 0.7],
        ("glora", 1): [0.6, 0.65],
        ("fedit", 0): [0.55, 0.6],
        ("fedit", 1): [0.7, 0.75],
    }
    outcomes = []
    for (label, seed), accs in series.items():
        run = tmp_path / "runs" / f"{label}-seed{seed}"
        run.mkdir(parents=True)
        lines = [
            json.dumps({"round": i + 1, "metrics": {"accuracy": a}, "bytes_up": 10})
            for i, a in enumerate(accs)
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        outcomes.append(RunOutcome(label, label, seed, "done", run_dir=f"runs/{run.name}"))
    write_report(tmp_path, outcomes, base={"data": {"task": "sst2"}}, metric="accuracy")
    rows = list(csv.DictReader((tmp_path / "per_seed.csv").open()))
    assert [(r["method"], r["seed"], float(r["final"]), float(r["best"])) for r in rows] == [
        ("glora", "0", 0.7, 0.7),
        ("glora", "1", 0.65, 0.65),
        ("fedit", "0", 0.6, 0.6),
        ("fedit", "1", 0.75, 0.75),
    ]
    assert json.loads(rows[0]["curve"]) == {"1": 0.5, "2": 0.7}
    (paired,) = list(csv.DictReader((tmp_path / "paired.csv").open()))
    assert paired["method"] == "fedit" and paired["reference"] == "glora"
    assert float(paired["diff_mean"]) == pytest.approx((-0.1 + 0.1) / 2)
    assert paired["better"] == "1" and paired["seeds"] == "2"
    report = (tmp_path / "report.md").read_text()
    assert "Paired by seed" in report and "1/2" in report
    with pytest.raises(ValueError, match="'flexlora' is not one of the compared methods"):
        write_report(tmp_path, outcomes, base={}, metric="accuracy", reference="flexlora")
    with pytest.raises(ValueError, match="not one of the compared methods"):  # before any run
        run_compare({"method": {"name": "glora"}}, "glora", [0], tmp_path / "x", reference="fedit")
    assert not (tmp_path / "x" / "runs").exists()
    write_report(tmp_path, outcomes, base={}, metric="accuracy", reference="fedit")
    (paired,) = list(csv.DictReader((tmp_path / "paired.csv").open()))
    assert paired["method"] == "glora" and paired["reference"] == "fedit"


def test_calls_on_disjoint_seeds_share_status_json(tmp_path):
    """Two calls (e.g. two processes) that run other seeds into one report directory keep each
    other's status entries and wall times; a last call over all seeds skips every finished run
    and reports both wall times. A call of another base config replaces the file whole."""
    from glora.compare import RunOutcome

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    times = {0: 11.0, 1: 22.0}

    def fake(config, resume):
        """Write a finished one-round run directory, without training."""
        _write_rounds(config, [{"round": 1, "metrics": {"accuracy": 0.5 + config.seed / 10}}])

    for seed in (0, 1):  # as two processes would, one seed each
        run_compare(cfg, "glora", [seed], out, resume=True, log=None, runs_dir=runs, runner=fake)
        status = json.loads((out / "status.json").read_text())
        (entry,) = [r for r in status["runs"] if r["seed"] == seed]
        entry["wall_seconds"] = times[seed]  # stand-ins for measured times
        (out / "status.json").write_text(json.dumps(status))
    status = json.loads((out / "status.json").read_text())
    assert sorted(r["key"] for r in status["runs"]) == ["glora|0", "glora|1"]
    assert status["seeds"] == [0, 1]

    calls: list[str] = []
    outcomes = run_compare(
        cfg,
        "glora",
        [0, 1],
        out,
        resume=True,
        log=None,
        runs_dir=runs,
        runner=lambda c, r: calls.append(c.name),
    )
    assert calls == []
    assert [(o.seed, o.status, o.wall_seconds) for o in outcomes] == [
        (0, "done", 11.0),
        (1, "done", 22.0),
    ]
    write_report(out)  # a report-only rebuild sees both seeds
    (row,) = list(csv.DictReader((out / "table.csv").open()))
    assert math.isclose(float(row["final_mean"]), 0.55)

    # a status of another base config is another federation: it replaces the file whole
    status_of_other = [RunOutcome("glora", "glora", 0, "unsupported", reason="x")]
    from glora.compare import _save_status

    meta = {"base_config": {"other": True}, "methods": [], "seeds": [0]}
    _save_status(out, status_of_other, meta)
    status = json.loads((out / "status.json").read_text())
    assert [r["key"] for r in status["runs"]] == ["glora|0"] and status["seeds"] == [0]


def test_status_write_waits_for_another_writer(tmp_path):
    """A second process's read-merge-write of status.json waits while one holds the directory
    lock, so neither can drop the other's entries."""
    import fcntl
    import os
    import threading

    from glora.compare import RunOutcome, _save_status

    out = tmp_path / "report"
    out.mkdir()
    meta = {"base_config": {"a": 1}, "methods": [{"label": "glora"}], "seeds": [0]}
    outcome = RunOutcome(label="glora", method="glora", seed=0, status="done")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # another writer holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Thread(target=_save_status, args=(out, [outcome], meta))
    writer.start()
    try:
        writer.join(0.5)
        assert writer.is_alive() and not (out / "status.json").exists()
    finally:
        os.close(fd)  # releases it
    writer.join(30)
    assert not writer.is_alive()
    status = json.loads((out / "status.json").read_text())
    assert [r["key"] for r in status["runs"]] == ["glora|0"]
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]  # no lock file left


def test_a_twelve_rule_plot_gives_every_curve_its_own_colour_and_style() -> None:
    # matplotlib's default cycle has 10 colours; a report of all 12 rules used to draw two
    # pairs of rules in the same colour and style.
    from glora.compare import _curve_styles

    colors = [f"C{i}" for i in range(10)]
    styles = _curve_styles(12, colors)
    assert len(set(styles)) == 12
    assert styles[:10] == [(c, "-") for c in colors]  # up to 10 curves: unchanged look
    assert styles[10:] == [("C0", "--"), ("C1", "--")]
    assert len(set(_curve_styles(40, colors))) == 40


def test_a_reused_or_resumed_run_names_the_settings_it_differs_on(tmp_path):
    """A finished run (from its directory or from records/) reused under another thread count,
    and an unfinished one resumed under it, are allowed but not silent: the log names the key."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 2}}))
    out, runs = tmp_path / "report", tmp_path / "runs"

    def write(config, rounds):
        _write_rounds(config, [{"round": r, "metrics": {"accuracy": 0.5}} for r in rounds])

    def cut(config, resume):
        write(config, [1])
        raise KeyboardInterrupt

    def finish(config, resume):
        write(config, [2])

    def grid(runner, *overrides: str) -> list[str]:
        logs: list[str] = []
        run_compare(
            cfg,
            "glora",
            [0],
            out,
            resume=True,
            log=logs.append,
            runs_dir=runs,
            runner=runner,
            overrides=list(overrides),
        )
        return logs

    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs, runner=cut)
    note = " (it differs from this call on training.num_threads 1 → 2)"
    (line,) = grid(finish, "training.num_threads=2")
    assert line.startswith("[glora seed 0] resuming → ") and line.endswith(note)
    (line,) = grid(finish, "training.num_threads=2")
    assert line == f"[glora seed 0] finished earlier: skipped{note}"
    (line,) = grid(finish)  # the thread count it was started with: nothing to say
    assert line == "[glora seed 0] finished earlier: skipped"
    shutil.rmtree(runs)
    (line,) = grid(finish, "training.num_threads=2", "training.eval_every=2")
    assert line == (
        "[glora seed 0] finished earlier (kept in records/): skipped (it differs from this call "
        "on training.eval_every 1 → 2, training.num_threads 1 → 2)"
    )


def test_a_run_taken_further_is_reported_at_the_planned_last_round(tmp_path):
    """A finished run whose directory was later continued to more rounds (as runs copied to a
    longer budget) is reused, with a note, and reported at the comparison's own last round."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 2}}))
    out, runs = tmp_path / "report", tmp_path / "runs"

    def fake(config, resume):
        _write_rounds(config, [{"round": r, "metrics": {"accuracy": 0.5}} for r in (1, 2)])

    run_compare(cfg, "glora", [0], out, log=None, runs_dir=runs, runner=fake)
    run_dir = runs / "glora-seed0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["training"]["rounds"] = 3  # continued in place to a third round
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 3, "metrics": {"accuracy": 0.9}, "wall_seconds": 1.0}) + "\n")
    logs: list[str] = []
    run_compare(cfg, "glora", [0], out, resume=True, log=logs.append, runs_dir=runs, runner=fake)
    assert logs == [
        "[glora seed 0] finished earlier: skipped (it differs from this call on "
        "training.rounds 3 → 2)"
    ]
    row = next(csv.DictReader((out / "table.csv").open()))
    assert float(row["final_mean"]) == 0.5 and float(row["best_mean"]) == 0.5
    write_report(out)  # the report-only rebuild cuts the same way
    assert float(next(csv.DictReader((out / "table.csv").open()))["final_mean"]) == 0.5


def test_a_run_finished_by_another_process_keeps_its_wall_time(tmp_path):
    """Two processes on one cell: a run the other process finished (found finished here, or
    refused here because the other still held it) keeps the other's status entry and wall time
    instead of this call's 0 s or 'failed'."""
    from dataclasses import asdict

    from glora.compare import RunOutcome
    from glora.sim.rundir import RunDirLocked

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "training": {**BASE["training"], "rounds": 1}}))
    out, runs = tmp_path / "report", tmp_path / "runs"
    done = {"round": 1, "metrics": {"accuracy": 0.5}, "wall_seconds": 1.0}

    def other_process_finishes(config, label: str, wall: float) -> None:
        """What the other process leaves: a finished run directory and its status entry."""
        _write_rounds(config.model_copy(update={"name": f"{label}-seed0"}), [done])
        path = out / "status.json"
        status = (
            json.loads(path.read_text())
            if path.exists()
            else {"base_config": yaml.safe_load(cfg.read_text()), "runs": []}
        )
        entry = RunOutcome(label, label, 0, "done", run_dir=f"../runs/{label}-seed0")
        entry.wall_seconds = wall
        status["runs"].append({"key": f"{label}|0", **asdict(entry)})
        path.write_text(json.dumps(status))

    def runner(config, resume):
        if config.name == "glora-seed0":  # meanwhile the other process finishes flexlora ...
            _write_rounds(config, [done])
            other_process_finishes(config, "flexlora", 123.0)
        else:  # ... and hetlora, just after this process was refused its lock
            other_process_finishes(config, "hetlora", 77.0)
            raise RunDirLocked("in use by another glora run")

    run_compare(cfg, "glora,flexlora,hetlora", [0], out, log=None, runs_dir=runs, runner=runner)
    by_key = {r["key"]: r for r in json.loads((out / "status.json").read_text())["runs"]}
    assert (by_key["flexlora|0"]["status"], by_key["flexlora|0"]["wall_seconds"]) == ("done", 123.0)
    assert (by_key["hetlora|0"]["status"], by_key["hetlora|0"]["wall_seconds"]) == ("done", 77.0)
    assert by_key["glora|0"]["status"] == "done"
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert rows["hetlora"]["seeds_done"] == "1"  # the report counts it too
