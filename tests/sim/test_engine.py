"""The simulator on a tiny BERT: every aggregator, dropped clients, bytes, run dirs, resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glora import aggregators
from glora.config import validate_config
from glora.sim import RunDirError, resume_config, run_experiment
from glora.sim.engine import Simulation
from glora.sim.rundir import RunDir
from tests.sim.conftest import tiny_raw

METHODS = [*aggregators.available(), "centralized"]


@pytest.mark.parametrize("method", METHODS)
def test_one_round_every_method(method: str, glue_dir: Path, tmp_path: Path) -> None:
    cls = aggregators.get_class("fedit" if method == "centralized" else method)
    opts = {} if cls.mixed_ranks or method == "centralized" else {"pad": True}
    cfg = validate_config(tiny_raw(glue_dir, tmp_path, method={"name": method, **opts}))
    sim = Simulation(cfg)
    (rec,) = sim.run()
    assert rec["round"] == 1 and rec["method"] == method
    assert rec["dropped"] == {}
    assert rec["participants"] == (["0"] if method == "centralized" else ["0", "1"])
    assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0
    assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0
    json.dumps(rec)  # JSON-able
    plan = sim.agg.client_plan(1)
    if plan.local:
        assert "personalized" in rec["metrics"]
    assert sim.state.round == 1


def test_centralized_steps(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(
        tiny_raw(
            glue_dir,
            tmp_path,
            method={"name": "centralized"},
            federation={"clients": 4, "participation": 0.5},
        )
    )
    sim = Simulation(cfg)
    assert sim.num_clients == 1 and sim.local_steps == 2 * 2 and sim.ranks == [4]


def test_nan_client_is_dropped(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(tiny_raw(glue_dir, tmp_path, training={"rounds": 2}))

    def hook(cid: str, rnd: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if (cid == "1" and rnd == 1) else loss

    sim = Simulation(cfg, loss_hook=hook)
    r1, r2 = sim.run()
    assert set(r1["dropped"]) == {"1"} and "non-finite" in r1["dropped"]["1"]
    assert r2["dropped"] == {}
    assert sim.state.round == 2
    assert all(torch.isfinite(f.B).all() for f in sim.global_effective().values())


def test_hooks_see_each_kept_update_its_start_and_the_round(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(tiny_raw(glue_dir, tmp_path, training={"rounds": 2}))
    seen: list[tuple[int, str, dict, object]] = []

    def nan_client_1(cid: str, rnd: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if (cid == "1" and rnd == 2) else loss

    sim = Simulation(cfg, loss_hook=nan_client_1)
    readouts: dict[int, dict] = {}
    real = sim.agg.aggregate
    aggregated: list[list] = []

    def aggregate(updates):
        aggregated.append(list(updates))
        return real(updates)

    def before_aggregation(t, updates):
        assert sim.state.round == t - 1  # still the state the clients started from
        readouts[t] = {r: sim.agg.readout(sim.state, r) for r in (2, 4)}
        assert [u for r, _, _, u in seen if r == t] == list(updates)

    sim.agg.aggregate = aggregate  # type: ignore[method-assign]
    sim.update_hook = lambda t, start, u: seen.append((t, u.client_id, dict(start), u))
    sim.aggregate_hook = before_aggregation
    _, r2 = sim.run()
    assert set(r2["dropped"]) == {"1"}
    assert [(t, cid) for t, cid, _, _ in seen] == [(1, "0"), (1, "1"), (2, "0")]
    assert sorted(readouts) == [1, 2]
    assert [[u.client_id for u in ups] for ups in aggregated] == [["0", "1"], ["0"]]
    for t, cid, start, _ in seen:
        want = readouts[t][sim.ranks[int(cid)]]
        for m, f in start.items():
            assert f.A.dtype == torch.float32
            assert torch.equal(f.A, want[m].A.float()) and torch.equal(f.B, want[m].B.float())


def test_invalid_update_is_dropped(glue_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = validate_config(tiny_raw(glue_dir, tmp_path))
    sim = Simulation(cfg)
    real = sim.agg.prepare_upload

    def corrupt(t, received, trained):
        out = real(t, received, trained)
        if trained is not None and len(out) and next(iter(out.values())).rank == 4:
            m = next(iter(out))
            out[m] = type(out[m])(A=out[m].A * float("inf"), B=out[m].B)
        return out

    monkeypatch.setattr(sim.agg, "prepare_upload", corrupt)
    (rec,) = sim.run()
    assert set(rec["dropped"]) == {"1"} and "invalid update" in rec["dropped"]["1"]
    assert sim.state.round == 1


def test_bytes_accounting(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(
        tiny_raw(glue_dir, tmp_path, method={"name": "fedsa", "pad": True}, training={"rounds": 2})
    )
    sim = Simulation(cfg)
    r1, r2 = sim.run()
    shapes = sim.model.shapes
    head = sum(t.numel() * 4 for t in sim.head.values())

    def nbytes(which: str, r: int) -> int:
        return sum(4 * r * (k if which == "A" else d) for d, k in shapes.values())

    # FedSA: upload A (+ head); download A, plus the local B on a client's first round
    assert r1["bytes_up"] == nbytes("A", 2) + nbytes("A", 4) + 2 * head
    assert r1["bytes_down"] == sum(nbytes("A", r) + nbytes("B", r) for r in (2, 4)) + 2 * head
    assert r2["bytes_down"] == nbytes("A", 2) + nbytes("A", 4) + 2 * head


def test_base_delta_bytes(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(
        tiny_raw(glue_dir, tmp_path, method={"name": "flora"}, training={"rounds": 2})
    )
    sim = Simulation(cfg)
    r1, r2 = sim.run()
    inc = sim.state.info["base_delta_increments"]
    assert r2["bytes_down"] == r1["bytes_down"] + 2 * int(inc["1"])  # both clients


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_run_dir_protection_and_lock(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(tiny_raw(glue_dir, tmp_path))
    res = run_experiment(cfg)
    rd = res.run_dir
    assert (rd / "config.yaml").is_file() and (rd / "adapter" / "adapter_config.json").is_file()
    assert [r["round"] for r in res.records] == [1]
    with pytest.raises(RunDirError, match="already holds a run"):
        run_experiment(cfg)
    with RunDir(rd), pytest.raises(RunDirError, match="in use by another"):
        run_experiment(cfg, overwrite=True)
    # the lock is per open file description: a second holder in another thread is refused too
    errors: list[Exception] = []
    with RunDir(rd):
        t = threading.Thread(target=lambda: _try_lock(rd, errors))
        t.start()
        t.join()
    assert errors and isinstance(errors[0], RunDirError)
    res2 = run_experiment(cfg, overwrite=True)
    assert [r["round"] for r in res2.records] == [1]


def _try_lock(path: Path, errors: list[Exception]) -> None:
    try:
        RunDir(path).lock()
    except RunDirError as exc:
        errors.append(exc)


def test_resume_is_bit_identical(glue_dir: Path, tmp_path: Path) -> None:
    method = {"name": "fedsa", "pad": True}  # a method with client-local state
    full = validate_config(
        tiny_raw(glue_dir, tmp_path / "a", method=method, training={"rounds": 2}, name="full")
    )
    ref = run_experiment(full)
    part = validate_config(
        tiny_raw(glue_dir, tmp_path / "b", method=method, training={"rounds": 1}, name="part")
    )
    first = run_experiment(part)
    assert [r["round"] for r in first.records] == [1]
    cfg2 = resume_config(
        first.run_dir,
        part.model_copy(update={"training": part.training.model_copy(update={"rounds": 2})}),
    )
    resumed = run_experiment(cfg2, resume=True)
    assert [r["round"] for r in resumed.records] == [1, 2]
    a, b = _adapter_tensors(ref.run_dir), _adapter_tensors(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ref.records[-1]["train_loss"] == resumed.records[-1]["train_loss"]


def test_resume_names_a_changed_arithmetic_setting(glue_dir: Path, tmp_path: Path) -> None:
    """A resume may change the evaluation batch size, thread count or device, but then does not
    repeat an uninterrupted run bit for bit: it says so (and says nothing when none changed)."""
    from io import StringIO

    from rich.console import Console

    part = validate_config(tiny_raw(glue_dir, tmp_path, training={"rounds": 1}))
    first = run_experiment(part)

    def resume(rounds: int, **training: object) -> str:
        buf = StringIO()
        update = {"rounds": rounds, **training}
        new = part.model_copy(update={"training": part.training.model_copy(update=update)})
        run_experiment(
            resume_config(first.run_dir, new), resume=True, console=Console(file=buf, width=200)
        )
        return buf.getvalue()

    text = resume(2, eval_batch_size=16)
    assert "resuming" in text and "after round 1" in text
    assert "note: training.eval_batch_size 32 → 16 from round 2" in text
    assert "note:" not in resume(3, eval_batch_size=16)  # config.yaml now holds 16


def test_resume_rejects_other_config(glue_dir: Path, tmp_path: Path) -> None:
    cfg = validate_config(tiny_raw(glue_dir, tmp_path))
    res = run_experiment(cfg)
    other = cfg.model_copy(update={"seed": 1})
    with pytest.raises(RunDirError, match="seed"):
        resume_config(res.run_dir, other)


def test_adapter_reproduces_global_logits(glue_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = validate_config(
        tiny_raw(glue_dir, tmp_path, method={"name": "fedex", "pad": True}, training={"rounds": 2})
    )
    res = run_experiment(cfg)
    sim = res.simulation
    batch = sim.task.collate(sim.task.eval_examples()[:8])
    batch.pop("labels")
    sim.apply_global()
    sim.model.peft.eval()
    with torch.no_grad(), sim.model.adapters_disabled():
        ref = sim.model.peft(**batch).logits
    base, _ = sim.task.build_model()
    loaded = PeftModel.from_pretrained(base, str(res.run_dir / "adapter")).eval()
    with torch.no_grad():
        out = loaded(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
