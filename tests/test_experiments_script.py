"""scripts/experiments.py summarize: one table over the settings of a results directory."""

from __future__ import annotations

import argparse
import importlib.util
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
