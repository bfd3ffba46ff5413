"""Slow: the SuperLink dies mid-run; `glora flower run --resume` continues from the checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "data" / "tiny.yaml"
GLUE = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
)  # ../shared next to the checkout


def _glora_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "glora"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from glora.cli import main; main()"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def _flower_procs(workdirs: list[Path]) -> dict[int, str]:
    """``{pid: args}`` of the live flower/flwr processes started in one of ``workdirs``.

    Reads ``/proc`` directly: ``ps`` cuts its output at 80 columns when it is not writing to a
    terminal, which hides ``flower-superlink`` behind a long venv path."""
    roots = [str(w.resolve()) for w in workdirs]
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone, or not ours
        if "flower-" not in args and "flwr" not in args:
            continue
        if any(cwd == r or cwd.startswith(r + os.sep) for r in roots):
            found[int(proc.name)] = args
    return found


def _superlink_pid(workdir: Path) -> int | None:
    for pid, args in _flower_procs([workdir]).items():
        if "flower-superlink" in args:
            return pid
    return None


def _kill_all(workdirs: list[Path]) -> None:
    for pid in _flower_procs(workdirs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_superlink_killed_then_resume(tmp_path: Path) -> None:
    """Kill the SuperLink after round 1's checkpoint: the launcher stops every process and
    exits non-zero; `--resume` completes rounds 2..3 and metrics.jsonl has 1..3 once each."""
    text = (
        TINY.read_text()
        .replace("output: {dir: runs}", f"output: {{dir: {tmp_path / 'runs'}}}")
        .replace("../shared/data/glue", str(GLUE))
    )
    text = text.replace("rounds: 2", "rounds: 3")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(text)
    run_dir = tmp_path / "runs" / "flower-tiny"
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    env = _env(tmp_path)
    log1 = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    launcher = subprocess.Popen(
        [*_glora_cmd(), "flower", "run", str(cfg_path), "--supernodes", "2", "--workdir", str(w1)],
        stdout=log1,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        # A hang guard, not a timing check: on this 2-core machine, with nothing else running,
        # the first checkpoint (Flower start-up plus one round) was seen at ~65 s.
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round_0001").is_dir():
            assert launcher.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "round 1's checkpoint never appeared"
            time.sleep(0.1)
        link = _superlink_pid(w1)
        assert link is not None, _flower_procs([w1])
        os.kill(link, signal.SIGKILL)
        rc = launcher.wait(60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(30)
        log1.close()
        leftover = _flower_procs([w1])
        _kill_all([w1])
    first = (tmp_path / "first.log").read_text()
    assert rc != 0, first
    assert "superlink died" in first.lower(), first[-4000:]
    assert leftover == {}, leftover
    assert 1 in [r["round"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())]

    try:
        res = subprocess.run(
            [
                *_glora_cmd(),
                "flower",
                "run",
                "--resume",
                str(run_dir),
                "--supernodes",
                "2",
                "--workdir",
                str(w2),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        leftover = _flower_procs([w2])
        _kill_all([w2])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert leftover == {}, leftover
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "round_0003" / "manifest.json").exists()
