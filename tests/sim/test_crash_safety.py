"""Crash safety of `glora run`: SIGKILL mid-round + resume, verified checkpoints, fallback."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from glora.cli import app
from glora.config import validate_config
from glora.sim import RunDirError, run_experiment
from glora.sim.rundir import MANIFEST, RunDir
from tests.sim.conftest import tiny_raw

#: Local steps per client and round: enough for round 2 to take a second or two.
SLOW_STEPS = 60
ROUNDS = 3


def _crash_raw(glue: Path, out: Path, name: str) -> dict[str, Any]:
    return tiny_raw(
        glue,
        out,
        name=name,
        method={"name": "fedsa", "pad": True},  # client-local state in the checkpoints too
        training={"rounds": ROUNDS, "local_steps": SLOW_STEPS, "checkpoint_every": 1},
    )


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = _adapter(a_dir), _adapter(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rounds(run_dir: Path) -> list[int]:
    return [r["round"] for r in RunDir(run_dir).read_metrics()]


def _glora_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "glora"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from glora.cli import main; main()"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


@pytest.fixture(scope="module")
def reference(glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the crash config; its run directory."""
    out = tmp_path_factory.mktemp("reference")
    return run_experiment(validate_config(_crash_raw(glue_dir, out, "full"))).run_dir


def test_sigkill_mid_round_then_resume(glue_dir: Path, tmp_path: Path, reference: Path) -> None:
    """SIGKILL in round 2, then `glora run --resume`: bit-identical to the uninterrupted run."""
    cfg_path = tmp_path / "crash.yaml"
    cfg_path.write_text(yaml.safe_dump(_crash_raw(glue_dir, tmp_path / "runs", "crash")))
    run_dir = tmp_path / "runs" / "crash"
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*_glora_cmd(), "run", str(cfg_path), "--quiet"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "round_0001").is_dir():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "round 1's checkpoint never appeared"
            time.sleep(0.05)
        time.sleep(0.1)  # inside round 2 (the asserts below check it was not finished)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()

    rd = RunDir(run_dir)
    # killed mid-round: round 1 complete, round 2 neither logged nor checkpointed
    assert _rounds(run_dir) == [1]
    assert rd.checkpoint_rounds() == [1]
    names = {p.name for p in rd.checkpoints_path.iterdir()}
    assert {n for n in names if not n.startswith(".tmp-")} == {"round_0001"}
    assert rd.verify_checkpoint(1)  # complete and sealed by its manifest
    # the lock of the SIGKILLed process died with it (flock is released by the kernel)
    assert (run_dir / ".lock").read_text().strip() == str(proc.pid)
    with RunDir(run_dir):
        pass
    # the leftover of a save interrupted by a crash is ignored, then removed on resume
    stale = rd.checkpoints_path / ".tmp-crashed"
    stale.mkdir()
    (stale / "server.safetensors").write_bytes(b"\0" * 7)

    res = subprocess.run(
        [*_glora_cmd(), "run", "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert _rounds(run_dir) == [1, 2, 3]
    assert rd.checkpoint_rounds() == [1, 2, 3]
    assert not stale.exists()
    _assert_same_adapter(reference, run_dir)


def test_truncated_latest_checkpoint_falls_back(
    glue_dir: Path, tmp_path: Path, reference: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated server.safetensors in the newest checkpoint: resume from the one before."""
    cfg = validate_config(_crash_raw(glue_dir, tmp_path, "trunc"))
    res = run_experiment(cfg)
    rd = RunDir(res.run_dir)
    assert rd.checkpoint_rounds() == [1, 2, 3]
    bad = rd.checkpoint_path(3) / "server.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match=r"round_0003.*server\.safetensors"):
        rd.load_checkpoint(3)
    with caplog.at_level(logging.WARNING, logger="glora.sim"):
        resumed = run_experiment(cfg, resume=True)
    text = caplog.text
    assert "round_0003" in text and "server.safetensors" in text
    assert "round 2 instead of round 3" in text
    assert [r["round"] for r in resumed.records] == [1, 2, 3]
    assert rd.verify_checkpoint(3)  # rewritten by the resumed run
    _assert_same_adapter(reference, res.run_dir)


def _small_run(glue: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fast 3-round run with a checkpoint every round; (config path, run dir)."""
    raw = tiny_raw(glue, tmp_path / "runs", training={"rounds": 3, "checkpoint_every": 1})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["run", str(cfg_path), "--quiet"])
    assert res.exit_code == 0, res.output
    return cfg_path, tmp_path / "runs" / "tiny"


def test_every_checkpoint_corrupt_is_a_clear_error(glue_dir: Path, tmp_path: Path) -> None:
    """No checkpoint verifies: `glora run --resume` exits 2, names each one, no traceback."""
    _, run_dir = _small_run(glue_dir, tmp_path)
    rd = RunDir(run_dir)
    # round 1: a flipped byte (same size, wrong hash)
    head = rd.checkpoint_path(1) / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    # round 2: a missing file
    (rd.checkpoint_path(2) / "clients.json").unlink()
    # round 3: a truncated file
    server = rd.checkpoint_path(3) / "server.safetensors"
    server.write_bytes(server.read_bytes()[:10])
    before = (run_dir / "metrics.jsonl").read_text()

    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--quiet"])
    assert res.exit_code == 2, res.output
    out = res.output
    assert "no valid checkpoint" in out
    assert "round_0001" in out and "head.safetensors" in out and "SHA-256" in out
    assert "round_0002" in out and "clients.json is missing" in out
    assert "round_0003" in out and "server.safetensors has 10 bytes" in out
    assert "Traceback" not in out
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing touched


def test_corrupt_manifest_and_unparsable_json(glue_dir: Path, tmp_path: Path) -> None:
    """A broken manifest or a JSON file that does not parse: RunDirError naming the file."""
    cfg = validate_config(tiny_raw(glue_dir, tmp_path, training={"checkpoint_every": 1}))
    rd = RunDir(run_experiment(cfg).run_dir)
    p = rd.checkpoint_path(1)
    manifest = json.loads((p / MANIFEST).read_text())
    assert set(manifest["files"]) == {
        "server.safetensors",
        "head.safetensors",
        "clients.safetensors",
        "clients.json",
        "server.json",
    }
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    (p / MANIFEST).write_text("{not json")
    with pytest.raises(RunDirError, match=r"round_0001.*manifest\.json is unreadable"):
        rd.load_checkpoint()
    # an older checkpoint without a manifest whose JSON is broken: parse-checked
    (p / MANIFEST).unlink()
    (p / "clients.json").write_text("{")
    with pytest.raises(RunDirError, match=r"round_0001.*clients\.json is not valid JSON"):
        rd.load_checkpoint(1)


def test_checkpoint_without_manifest_is_loadable(
    glue_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints of older glora (no manifest) load unverified, with a warning; a truncated
    safetensors file in one is still rejected by parsing."""
    cfg = validate_config(tiny_raw(glue_dir, tmp_path, training={"checkpoint_every": 1}))
    rd = RunDir(run_experiment(cfg).run_dir)
    p = rd.checkpoint_path(1)
    ref = rd.load_checkpoint()
    (p / MANIFEST).unlink()
    assert rd.checkpoint_rounds() == [1]
    assert rd.verify_checkpoint(1) is False
    with caplog.at_level(logging.WARNING, logger="glora.sim"):
        old = rd.load_checkpoint()
    assert "unverified" in caplog.text
    assert old.round == ref.round == 1
    for k, t in ref.head.items():
        assert torch.equal(old.head[k], t)
    head = p / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-5])
    with pytest.raises(RunDirError, match=r"round_0001.*head\.safetensors is not a valid"):
        rd.load_checkpoint()
