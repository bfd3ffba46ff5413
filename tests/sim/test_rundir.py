"""RunDir's metrics file is strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from glora.sim.rundir import RunDir


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir(parents=True)
    run_dir.append_metrics(
        {
            "round": 1,
            "train_loss": math.nan,
            "metrics": {"pearson": math.inf, "spearman": 0.5, "per": [1.0, -math.inf]},
        }
    )
    line = run_dir.metrics_path.read_text(encoding="utf-8").splitlines()[0]
    record = _strict(line)
    assert record == {
        "round": 1,
        "train_loss": None,
        "metrics": {"pearson": None, "spearman": 0.5, "per": [1.0, None]},
    }
