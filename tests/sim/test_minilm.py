"""Integration: the real all-MiniLM-L6-v2 on a small SST-2 slice (a few steps only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glora.config import validate_config
from glora.sim import run_experiment
from glora.sim.engine import Simulation

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"

pytestmark = pytest.mark.slow


def _loss(sim: Simulation, batch: dict[str, torch.Tensor]) -> float:
    sim.apply_global()
    sim.model.peft.eval()
    with torch.no_grad(), sim.model.adapters_disabled():
        out = float(sim.model.peft(**batch).loss)
    return out


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"shared GLUE data missing at {GLUE}")
def test_minilm_sst2_end_to_end(tmp_path: Path) -> None:
    from peft import PeftModel

    raw = {
        "name": "minilm",
        "model": {"name": "minilm", "max_length": 32},
        "data": {"task": "sst2", "dir": str(GLUE), "max_train_examples": 256,
                 "max_eval_examples": 64},
        "federation": {"clients": 2, "partition": "iid", "ranks": [4, 8], "participation": 1.0},
        "method": {"name": "glora"},
        "training": {"rounds": 2, "local_steps": 4, "batch_size": 16, "lr": 2e-3,
                     "device": "cpu", "num_threads": 2},
        "output": {"dir": str(tmp_path)},
    }  # fmt: skip
    res = run_experiment(validate_config(raw))
    sim = res.simulation
    batch = sim.task.collate(sim.task.train_examples()[:64])
    initial, _ = sim.task.build_model()  # = the round-0 global model (B = 0, initial head)
    with torch.no_grad():
        before = float(initial.eval()(**batch).loss)
    after = _loss(sim, batch)
    assert after < before, (before, after)

    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["dropped"] == {} and r["participants"] == ["0", "1"]
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["server_seconds"] >= 0

    batch.pop("labels")
    sim.apply_global()
    with torch.no_grad(), sim.model.adapters_disabled():
        ref = sim.model.peft(**batch).logits
    loaded = PeftModel.from_pretrained(initial, str(res.run_dir / "adapter")).eval()
    with torch.no_grad():
        out = loaded(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
