"""Slow: real flower-superlink + flower-supernode processes on 127.0.0.1 (stopped by PID)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from glora.config import load_config
from glora.flower.launch import APP_DIR, LocalFederation
from glora.peft_io import load_adapter

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "data" / "tiny.yaml"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _from_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the checkout root, as a user would: tiny.yaml's data.dir is ../shared/... ."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True)
def _offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _config(tmp_path: Path, *, resolved: bool = True) -> Path:
    """tiny.yaml with its output in tmp_path.

    ``resolved``: data.dir made absolute, as processes started by LocalFederation directly need
    (they run in their own directory); ``glora flower run`` resolves a relative one itself.
    """
    text = TINY.read_text().replace("output: {dir: runs}", f"output: {{dir: {tmp_path / 'runs'}}}")
    p = tmp_path / "tiny.yaml"
    p.write_text(text)
    if resolved:
        cfg = load_config(p).with_resolved_paths()
        p.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    return p


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        out.append(pid)
    return out


def test_flower_deployment_equals_glora_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`glora flower run` (2 SuperNodes) and `glora run` give the same adapter (<= 1e-6), and
    the resolved config copy it hands to Flower is removed afterwards."""
    from glora.cli.flower import register
    from glora.sim import run_experiment

    cfg_path = _config(tmp_path, resolved=False)  # relative data.dir, as in the README
    cfg = load_config(cfg_path)
    ref = cfg.model_copy(update={"name": "reference"})
    run_experiment(ref)

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    scratch = tmp_path / "scratch"  # where the CLI's temporary files go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    res = CliRunner().invoke(
        app, ["flower", "run", str(cfg_path), "--supernodes", "2", "--workdir", str(tmp_path / "w")]
    )
    assert res.exit_code == 0, res.output
    assert not any(scratch.glob("glora-flower-config-*")), "the temporary config was left behind"
    flower_dir = Path(cfg.run_dir)
    assert {p.name for p in flower_dir.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "adapter",
        "checkpoints",
    }
    a, _ = load_adapter(flower_dir / "adapter")
    b, _ = load_adapter(Path(ref.run_dir) / "adapter")
    assert set(a) == set(b)
    diff = max(float((a[m].delta() - b[m].delta()).abs().max()) for m in a)
    assert diff <= 1e-6
    fl = [json.loads(x) for x in (flower_dir / "metrics.jsonl").read_text().splitlines()]
    rf = [json.loads(x) for x in (Path(ref.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in fl] == [1, 2]
    for x, y in zip(fl, rf):
        assert x["participants"] == y["participants"] and x["dropped"] == {}
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
        assert x["metrics"] == pytest.approx(y["metrics"])
        assert set(y) <= set(x)


def test_supernode_killed_mid_run(tmp_path: Path) -> None:
    """A SuperNode killed after round 1: round 2 completes with the other reply, state saved."""
    cfg_path = _config(tmp_path)
    run_dir = tmp_path / "fault-run"
    fed = LocalFederation(2, workdir=tmp_path / "w")
    rc: list[int] = []
    with fed:
        pids = fed.pids()
        t = threading.Thread(
            target=lambda: rc.append(
                fed.run(
                    APP_DIR,
                    {
                        "config": str(cfg_path),
                        "run-dir": str(run_dir),
                        "round-timeout": 45.0,
                        "min-replies": 1,
                    },
                    timeout=400,
                )
            )
        )
        t.start()
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            metrics.exists() and metrics.read_text().strip()
        ):
            time.sleep(0.5)
        fed.kill_supernode(1)
        t.join(400)
    assert rc == [0], fed.logs()[-4000:]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert lines[0]["dropped"] == {}
    assert list(lines[1]["dropped"]) == ["1"]
    assert "aggregation_error" not in lines[1]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "round_0002" / "server.json").exists()
    time.sleep(1)
    assert _alive(pids) == []


def test_tls_and_supernode_auth_smoke(tmp_path: Path) -> None:
    """TLS (generated CA, cert for 127.0.0.1/localhost) + SuperNode authentication, 1 round."""
    cfg_path = _config(tmp_path)
    text = cfg_path.read_text().replace("rounds: 2", "rounds: 1")
    cfg_path.write_text(text)
    run_dir = tmp_path / "secure-run"
    with LocalFederation(2, workdir=tmp_path / "w", tls=True, auth=True) as fed:
        pids = fed.pids()
        assert (tmp_path / "w" / "certs" / "ca.crt").exists()
        rc = fed.run(APP_DIR, {"config": str(cfg_path), "run-dir": str(run_dir)}, timeout=300)
        assert rc == 0, fed.logs()[-4000:]
        assert "--enable-supernode-auth" in " ".join(fed.procs[0].popen.args)
    assert (run_dir / "adapter").exists()
    time.sleep(1)
    assert _alive(pids) == []
