"""Benchmark: wall time per round, Flower deployment (localhost processes) vs the in-process engine.

``python -m glora.bench.flower [CONFIG] [--supernodes N]`` runs the same config twice, with
``glora run``'s engine and with ``glora flower run``'s deployment (SuperLink + N SuperNodes on
127.0.0.1), and prints the per-round wall times (``wall_seconds`` of ``metrics.jsonl``), the
total wall times and the ratio Flower / in-process. Default config: the tiny test federation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT = Path(__file__).resolve().parents[3] / "tests" / "flower" / "data" / "tiny.yaml"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures; returns a process exit code."""
    ap = argparse.ArgumentParser(prog="python -m glora.bench.flower", description=__doc__)
    ap.add_argument("config", nargs="?", default=str(DEFAULT))
    ap.add_argument("--supernodes", type=int, default=None)
    args = ap.parse_args(argv)
    for k, v in {
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }.items():
        os.environ.setdefault(k, v)

    from glora.config import load_config
    from glora.flower.launch import APP_DIR, LocalFederation
    from glora.sim import run_experiment

    work = Path(tempfile.mkdtemp(prefix="glora-bench-flower-"))
    os.environ["FLWR_HOME"] = str(work / "flwr-home")
    cfg = load_config(args.config).with_resolved_paths()  # Flower processes run elsewhere
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(work)})})
    local = cfg.model_copy(update={"name": "inprocess"})
    t0 = time.perf_counter()
    run_experiment(local)
    t_local = time.perf_counter() - t0

    n = args.supernodes or cfg.effective_federation()[0]
    cfg_path = work / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    flower_dir = work / "flower"
    t0 = time.perf_counter()
    with LocalFederation(n, workdir=work / "fed") as fed:
        t_up = time.perf_counter() - t0
        rc = fed.run(APP_DIR, {"config": str(cfg_path), "run-dir": str(flower_dir)})
    t_flower = time.perf_counter() - t0
    if rc != 0:
        print(f"flwr run failed with exit code {rc}", file=sys.stderr)
        return 1
    a, b = _records(Path(local.run_dir)), _records(flower_dir)
    print(f"command: python -m glora.bench.flower {args.config} --supernodes {n}")
    print(f"config: {args.config} ({cfg.training.rounds} rounds, {cfg.federation.clients} clients)")
    print(f"{'round':>5} {'in-process s':>13} {'flower s':>10} {'ratio':>7}")
    for x, y in zip(a, b):
        ratio = y["wall_seconds"] / max(x["wall_seconds"], 1e-9)
        print(
            f"{x['round']:>5} {x['wall_seconds']:>13.3f} {y['wall_seconds']:>10.3f} {ratio:>7.1f}"
        )
    mean_a = sum(x["wall_seconds"] for x in a) / len(a)
    mean_b = sum(y["wall_seconds"] for y in b) / len(b)
    print(
        f"mean s/round: in-process {mean_a:.3f}, flower {mean_b:.3f}, ratio {mean_b / mean_a:.1f}"
    )
    print(
        f"total wall: in-process {t_local:.1f} s (incl. model load), flower {t_flower:.1f} s "
        f"(incl. {t_up:.1f} s SuperLink/SuperNode start-up), ratio {t_flower / t_local:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
