"""scripts/experiments.py summarize: one table over the settings of a results directory."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments.py"


def _load():
    spec = importlib.util.spec_from_file_location("experiments_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setting(root: Path, name: str, finals: dict[str, list[float]]) -> None:
    d = root / name
    d.mkdir(parents=True)
    rows = ["method,seeds_done,final_mean,final_std"]
    seeds = ["method,seed,final,best,curve"]
    for method, values in finals.items():
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        rows.append(f"{method},{len(values)},{mean},{sd}")
        seeds += [f"{method},{s},{v},{v},{{}}" for s, v in enumerate(values)]
    (d / "table.csv").write_text("\n".join(rows) + "\n")
    (d / "per_seed.csv").write_text("\n".join(seeds) + "\n")
    (d / "paired.csv").write_text(
        "method,reference,seeds,diff_mean,diff_std,better\nfedit,glora,3,0,0,0\n"
    )


def test_summarize_pairs_by_seed_with_p_values(tmp_path, capsys):
    mod = _load()
    _setting(tmp_path, "sst2-a0.5-het-p1", {"glora": [0.7, 0.6, 0.8], "fedit": [0.75, 0.5, 0.9]})
    assert mod.summarize(argparse.Namespace(results=str(tmp_path))) == 0
    text = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()  # printed as written
    # fedit − glora = +0.05, −0.10, +0.10: mean +0.017, better on 2 of 3 seeds; t-test with 2
    # degrees of freedom, p = 1 − |t| / √(2 + t²)
    diffs = [0.05, -0.10, 0.10]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    assert f"+0.017 ± 0.104 (2/3, p {p:.2f})" in text
    assert "| glora | 0.700 ± 0.100 (3) |" in text


def test_summarize_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="run the grid first"):
        _load().summarize(argparse.Namespace(results=str(tmp_path)))


def _lr_setting(root: Path, lr: float, finals: dict[str, list[float]]) -> None:
    _setting(root, "sst2-a0.5-het-p1", finals)
    (root / "index.json").write_text(json.dumps({"sst2-a0.5-het-p1": {"lr": lr}}))


def _lr_args(dirs: list[Path], out: Path | str = "") -> argparse.Namespace:
    return argparse.Namespace(
        results=[str(d) for d in dirs], setting="sst2-a0.5-het-p1", reference="glora", out=str(out)
    )


def test_lr_table_picks_each_methods_best_lr_and_pairs_them(tmp_path, capsys):
    mod = _load()
    a, b = tmp_path / "lr3e-3", tmp_path / "lr5e-3"
    _lr_setting(a, 3e-3, {"glora": [0.7, 0.6, 0.8], "fedit": [0.5, 0.5, 0.5]})
    _lr_setting(b, 5e-3, {"glora": [0.6, 0.6, 0.6], "fedit": [0.75, 0.5, 0.9], "ffa": [0.5] * 3})
    out = tmp_path / "lr.md"
    assert mod.lr_table(_lr_args([b, a], out)) == 0  # order of the directories does not matter
    text = out.read_text()
    assert capsys.readouterr().out == text
    assert "| method | lr 0.003 | lr 0.005 | best lr | lrs run |" in text
    assert "| glora | **0.700 ± 0.100 (3)** | 0.600 ± 0.000 (3) | 0.003 | 2 |" in text
    assert "| fedit | 0.500 ± 0.000 (3) | **0.717 ± 0.202 (3)** | 0.005 | 2 |" in text
    assert "| ffa | – | **0.500 ± 0.000 (3)** | 0.005 | 1 |" in text
    # fedit at 5e-3 − glora at 3e-3, paired by seed: +0.05, −0.10, +0.10 (2 of 3 better)
    diffs = [0.05, -0.10, 0.10]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(2 + t * t)
    assert f"| fedit | 0.005 | 2 | +0.017 ± 0.104 (2/3, p {p:.2f}) |" in text


def test_lr_table_rejects_missing_settings_and_duplicate_lrs(tmp_path):
    mod = _load()
    a, b = tmp_path / "a", tmp_path / "b"
    _lr_setting(a, 3e-3, {"glora": [0.7, 0.6, 0.8]})
    _lr_setting(b, 3e-3, {"glora": [0.7, 0.6, 0.8]})
    with pytest.raises(
        SystemExit, match=r"two results directories ran sst2-a0\.5-het-p1 at lr 0\.003"
    ):
        mod.lr_table(_lr_args([a, b]))
    with pytest.raises(SystemExit, match="no finished setting"):
        mod.lr_table(_lr_args([a, tmp_path / "empty"]))
    args = _lr_args([a])
    args.reference = "fedit"
    with pytest.raises(SystemExit, match="the reference 'fedit' was not run"):
        mod.lr_table(args)


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-round tiny-BERT GLoRA run (2 iid clients of ranks 2 and 4, 96 examples)."""
    from glora.config import validate_config
    from glora.sim import run_experiment
    from tests.sim.conftest import tiny_raw, write_glue

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = validate_config(tiny_raw(write_glue(root / "glue"), root / "out", training={"rounds": 2}))
    return run_experiment(cfg)


def test_spectrum_per_round_reads_checkpoints_and_matches_the_final_adapter(tiny_run, capsys):
    res = tiny_run
    mod = _load()
    run = str(res.run_dir)
    assert mod.spectrum(argparse.Namespace(runs=[run], rounds="1,2,7")) == 0
    per_round = _rows(capsys.readouterr().out)
    assert [r[1] for r in per_round] == ["1", "2"]  # round 7 has no checkpoint: skipped
    assert mod.spectrum(argparse.Namespace(runs=[run], rounds="")) == 0
    (final,) = _rows(capsys.readouterr().out)
    # round 2's checkpointed global update is the exported adapter: same norm and shares
    assert per_round[1][2:6] == final[1:5]
    shares = [float(x) for x in per_round[0][3:6]]
    assert 0 < shares[0] <= shares[1] <= shares[2] <= 1 + 1e-9
    losses = [f"{r['train_loss']:.3f}" for r in res.records]
    assert [r[6] for r in per_round] == losses
    assert per_round[1][7] == f"{res.records[1]['metrics']['accuracy']:.3f}"
    with pytest.raises(SystemExit, match="no checkpoint of rounds 9"):
        mod.spectrum(argparse.Namespace(runs=[run], rounds="9"))


def test_rank_regimes_het_rev_keeps_the_ranks_and_moves_them_to_other_clients():
    mod = _load()
    assert mod._regime("het", 10) == [2, 4, 8, 16]  # cycled by the config
    assert mod._regime("hom", 10) == 8
    rev = mod._regime("het-rev", 10)
    het = [2, 4, 8, 16] * 3
    assert rev == het[:10][::-1] == [4, 2, 16, 8, 4, 2, 16, 8, 4, 2]
    # same Σ ranks, so the ablation's R = Σ r_i is the same
    (spec,) = mod.ablation_specs("het-rev", 10, ["sum"])
    assert spec.options == {"server_rank": sum(het[:10])}
    with pytest.raises(SystemExit, match="--ranks takes het, het-rev, hom, got 'mixed'"):
        mod._regime("mixed", 10)


def test_clients_prints_each_clients_rank_examples_and_label_shares(tiny_run, capsys):
    assert _load().clients(argparse.Namespace(runs=[str(tiny_run.run_dir)])) == 0
    out = capsys.readouterr().out
    assert "| client | rank | examples | label 0 | label 1 |" in out
    rows = [r for r in _rows(out.split("\n", 2)[2]) if r[0] in ("0", "1", "eval")]
    assert [r[1] for r in rows] == ["2", "4", "–"]
    assert sum(int(r[2]) for r in rows[:2]) == 96  # every training example, once
    assert rows[2][2] == "16"  # data.max_eval_examples
    for r in rows:
        assert abs(float(r[3]) + float(r[4]) - 1) <= 0.011


def test_spectrum_and_clients_name_a_directory_that_is_not_a_run(tmp_path):
    mod = _load()
    with pytest.raises(SystemExit, match=r"no config\.yaml here; pass a run directory"):
        mod.clients(argparse.Namespace(runs=[str(tmp_path)]))
    with pytest.raises(SystemExit, match=r"no config\.yaml here; pass a run directory"):
        mod.spectrum(argparse.Namespace(runs=[str(tmp_path)], rounds="1"))


def _trace_rows(out: str) -> dict[str, list[str]]:
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| part")
    ]
    return {r[0]: r[1:] for r in rows}


def test_trace_replays_a_round_exactly_and_splits_its_change(tiny_run, capsys):
    import torch

    from glora import aggregators
    from glora.sim.rundir import RunDir

    mod = _load()
    run = str(tiny_run.run_dir)
    args = argparse.Namespace(runs=[run], rounds="1,2", probe=8, threads=1)
    assert mod.trace(args) == 0
    out = capsys.readouterr().out
    rounds = out.split("\n" + run + ", round ")[1:]
    assert [r.split(" ", 1)[0] for r in rounds] == ["1", "2"]
    # the replayed rounds reproduce the checkpoints bit for bit
    assert out.count("replay vs checkpoint: relative difference 0.0e+00") == 2
    rows = _trace_rows(rounds[1])
    assert list(rows) == [
        "client 0",
        "client 1",
        *(k for k in ("label-0 clients", "label-1 clients") if k in rows),
        "tail",
        "server",
        "total",
    ]
    assert [rows["client 0"][0], rows["client 1"][0]] == ["2", "4"]
    assert abs(float(rows["client 0"][1]) + float(rows["client 1"][1]) - 1) <= 2e-3
    # the parts add up to the round's change: their shares of ‖ΔU‖² sum to 1
    parts = ("client 0", "client 1", "tail", "server")
    assert abs(sum(float(rows[k][4]) for k in parts) - 1) <= 5e-3
    assert rows["total"][4] == "+1.000"
    # the total's norm is ‖U(2) − U(1)‖ from the checkpoints
    cfg = mod._run_config(Path(run))
    agg = aggregators.build(cfg.method.aggregator, **{"seed": cfg.seed, **cfg.method.options})
    dense = []
    for t in (1, 2):
        state = RunDir(run).load_checkpoint(t).state
        agg.load_state(state)
        dense.append(
            {m: f.B.double() @ f.A.double() for m, f in agg.effective_update(state).items()}
        )
    norm = sum(float(torch.linalg.matrix_norm(dense[1][m] - dense[0][m])) ** 2 for m in dense[0])
    assert rows["total"][3] == f"{math.sqrt(norm):.3f}"


def test_trace_names_what_it_cannot_replay(tiny_run, tmp_path):
    from glora.config import validate_config
    from glora.sim.engine import Simulation
    from tests.sim.conftest import tiny_raw, write_glue

    mod = _load()
    args = argparse.Namespace(runs=[str(tiny_run.run_dir)], rounds="5", probe=8, threads=1)
    with pytest.raises(SystemExit, match="no checkpoint of round 4 to replay round 5"):
        mod.trace(args)
    with pytest.raises(SystemExit, match=r"no config\.yaml here; pass a run directory"):
        mod.trace(argparse.Namespace(runs=[str(tmp_path)], rounds="1", probe=8, threads=1))
    raw = tiny_raw(
        write_glue(tmp_path / "glue"), tmp_path / "out", method={"name": "fedsa", "pad": True}
    )
    sim = Simulation(validate_config(raw))
    with pytest.raises(SystemExit, match=r"keep no local factors.*\(fedsa does\)"):
        mod.trace_round(sim, 1, [])
    # FedEx-LoRA's base increment appears only after its first round: caught after the round
    raw["method"] = {"name": "fedex", "pad": True}
    sim = Simulation(validate_config(raw))
    with pytest.raises(SystemExit, match=r"merges nothing into the base weights \(fedex does\)"):
        mod.trace_round(sim, 1, [])


def test_grid_set_overrides_every_runs_config_and_names_a_bad_one():
    from glora.config import validate_config

    mod = _load()
    args = argparse.Namespace(
        data_dir="data",
        max_train=None,
        max_eval=None,
        model="minilm",
        max_length=64,
        clients=10,
        rounds=2,
        local_steps=2,
        batch_size=16,
        lr=5e-3,
        device="cpu",
        eval_every=1,
        set=["training.use_rslora=true", "training.lora_alpha=8"],
    )
    raw = mod.base_config(args, "sst2", 0.1, "het", 1.0)
    cfg = validate_config(raw)
    assert cfg.training.use_rslora is True and cfg.training.lora_alpha == 8
    assert raw["federation"]["alpha"] == 0.1 and raw["training"]["lr"] == 5e-3  # the rest kept
    args.set = ["training"]
    with pytest.raises(SystemExit, match=r"expected dotted\.key=value"):
        mod.base_config(args, "sst2", 0.1, "het", 1.0)


def test_index_update_keeps_entries_written_by_another_process(tmp_path):
    mod = _load()
    entry = {"runs_done": 39, "runs": 39, "wall_seconds_all_runs": 3000.0, "rounds": 15}
    entry |= {"local_steps": 2, "max_train": 2000, "max_eval": 500, "seeds": [0, 1, 2]}
    mod._update_index(tmp_path, "sst2-a0.5-hom-p1", entry)
    # another grid process, started earlier on another setting, writes its entry afterwards
    mod._update_index(tmp_path, "sst2-a0.1-hom-p1", entry)
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index) == {"sst2-a0.5-hom-p1", "sst2-a0.1-hom-p1"}
    assert "sst2-a0.5-hom-p1" in (tmp_path / "index.md").read_text()
    assert not (tmp_path / "index.json.tmp").exists()
