"""Benchmarks of the simulator: ``python -m glora.bench.training throughput|memory|experiment``.

* ``throughput``: client training speed of the engine (``train_local`` on the multi-adapter
  model) vs a bare PEFT + torch loop on the same model and batches; ratio target ≥ 0.95.
* ``memory``: peak RSS of a run with 100 simulated clients vs 1 (same model, few steps, each in
  its own subprocess); ratio target ≤ 1.3.
* ``experiment``: SST-2, 10 clients, Dirichlet(0.5), ranks {2,4,8,16}, 50 % participation;
  glora vs fedit (zero-padded) vs flexlora vs centralized; accuracy and wall time.

Each prints its figures and the exact command. ``--quick`` runs a small version (tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["experiment", "memory", "throughput"]

GLUE_DIR = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "glue")


def _raw(model: str, out: str, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "bench",
        "seed": 0,
        "model": {"name": model, "max_length": 64},
        "data": {"task": "sst2", "dir": GLUE_DIR, "max_train_examples": 2000,
                 "max_eval_examples": 200},
        "federation": {"clients": 1, "partition": "iid", "ranks": 8, "participation": 1.0},
        "method": {"name": "fedit"},
        "training": {"rounds": 1, "local_steps": 20, "batch_size": 16, "device": "auto"},
        "output": {"dir": out},
    }  # fmt: skip
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return raw


def throughput(model: str = "minilm", steps: int = 30, repeats: int = 3) -> dict[str, float]:
    """Steps/s of the engine's client training vs a bare PEFT loop (same model and batches)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glora.config import validate_config
    from glora.linalg import derive_seed
    from glora.sim.client import batch_order, train_local
    from glora.sim.engine import Simulation

    cfg = validate_config(_raw(model, tempfile.mkdtemp(), training={"local_steps": steps}))
    sim = Simulation(cfg)
    task, examples = sim.task, sim.examples
    order = batch_order(len(examples), 16, steps=steps, epochs=None,
                        seed=derive_seed(0, "data", 1, "0"))  # fmt: skip

    def engine_once() -> float:
        params = sim.model.activate(8, frozenset({"A", "B"}), True)
        t = time.perf_counter()
        train_local(sim.model, task, examples, params, client_id="0", round=1, seed=0,
                    steps=steps, epochs=None, batch_size=16, lr=5e-4)  # fmt: skip
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t)

    base, _ = task.build_model()
    bare = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    bare.to(sim.device)
    for p in bare.get_base_model().classifier.parameters():
        p.requires_grad_(True)

    def bare_once() -> float:
        opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=5e-4)
        bare.train()
        t = time.perf_counter()
        for idx in order:  # the same per-step work: collate + forward + backward + step
            batch = task.collate([examples[int(i)] for i in idx])
            batch = {k: v.to(sim.device) for k, v in batch.items()}
            loss = bare(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t)

    engine_once(), bare_once()  # warm-up
    eng = max(engine_once() for _ in range(repeats))
    ref = max(bare_once() for _ in range(repeats))
    out = {"engine_steps_per_s": eng, "bare_steps_per_s": ref, "ratio": eng / ref}
    print(json.dumps(out, indent=2))
    print(f"target: ratio >= 0.95 -> {'OK' if out['ratio'] >= 0.95 else 'BELOW TARGET'}")
    print(f"command: python -m glora.bench.training throughput --model {model} --steps {steps}")
    return out


def _memory_child(clients: int, model: str, steps: int) -> None:
    from glora.config import validate_config
    from glora.sim.engine import Simulation

    raw = _raw(
        model,
        tempfile.mkdtemp(),
        federation={"clients": clients, "ranks": [2, 4, 8, 16], "participation": 1.0,
                    "partition": "iid"},
        method={"name": "glora"},
        data={"max_train_examples": max(2000, clients * 4), "max_eval_examples": 32},
        training={"rounds": 2, "local_steps": steps, "batch_size": 4, "device": "cpu"},
    )  # fmt: skip
    sim = Simulation(validate_config(raw))
    sim.run()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"clients": clients, "peak_rss_mb": peak_kb / 1024}))


def memory(model: str = "minilm", steps: int = 2) -> dict[str, float]:
    """Peak RSS with 100 simulated clients vs 1 (each in a subprocess)."""
    res = {}
    for n in (1, 100):
        proc = subprocess.run(
            [sys.executable, "-m", "glora.bench.training", "_memchild", str(n), model, str(steps)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        res[n] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    out = {"rss_1_client_mb": res[1], "rss_100_clients_mb": res[100], "ratio": res[100] / res[1]}
    print(json.dumps(out, indent=2))
    print(f"target: ratio <= 1.3 -> {'OK' if out['ratio'] <= 1.3 else 'ABOVE TARGET'}")
    print(f"command: python -m glora.bench.training memory --model {model} --steps {steps}")
    return out


def experiment(
    model: str = "minilm",
    rounds: int = 10,
    local_steps: int = 20,
    max_train: int | None = None,
    max_eval: int | None = None,
    methods: tuple[str, ...] = ("glora", "fedit", "flexlora", "centralized"),
) -> list[dict[str, Any]]:
    """SST-2, 10 clients, Dirichlet(0.5), ranks {2,4,8,16}, 50 % participation."""
    from glora.config import validate_config
    from glora.sim import run_experiment

    out_dir = tempfile.mkdtemp(prefix="glora-exp-")
    rows = []
    for m in methods:
        method: dict[str, Any] = {"name": m}
        if m == "fedit":
            method["pad"] = True  # FedIT is single-rank: zero-padding extension
        raw = _raw(
            model,
            out_dir,
            name=f"exp-{m}",
            federation={"clients": 10, "partition": "dirichlet", "alpha": 0.5,
                        "ranks": [2, 4, 8, 16], "participation": 0.5},
            method=method,
            data={"max_train_examples": max_train, "max_eval_examples": max_eval},
            training={"rounds": rounds, "local_steps": local_steps, "checkpoint_every": 10**6},
        )  # fmt: skip
        t = time.perf_counter()
        res = run_experiment(validate_config(raw), overwrite=True)
        wall = time.perf_counter() - t
        last = res.records[-1]["metrics"]
        rows.append({"method": m, "accuracy": last.get("accuracy"), "wall_s": wall})
        print(json.dumps(rows[-1]))
    print(f"{'method':<12} {'accuracy':>9} {'wall s':>8}")
    for r in rows:
        print(f"{r['method']:<12} {r['accuracy']:>9.4f} {r['wall_s']:>8.1f}")
    print(
        f"command: python -m glora.bench.training experiment --model {model} --rounds {rounds} "
        f"--local-steps {local_steps}"
        + (f" --max-train {max_train}" if max_train else "")
        + (f" --max-eval {max_eval}" if max_eval else "")
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memchild":
        _memory_child(int(argv[1]), argv[2], int(argv[3]))
        return
    ap = argparse.ArgumentParser(prog="python -m glora.bench.training")
    ap.add_argument("which", choices=["throughput", "memory", "experiment"])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-eval", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small version on the tiny model")
    a = ap.parse_args(argv)
    if a.quick:
        a.model = "tiny-bert"
    if a.which == "throughput":
        throughput(a.model, a.steps or (10 if a.quick else 30), repeats=2 if a.quick else 3)
    elif a.which == "memory":
        memory(a.model, a.steps or (1 if a.quick else 2))
    elif a.quick:
        experiment(a.model, rounds=2, local_steps=2, max_train=400, max_eval=64,
                   methods=("glora", "centralized"))  # fmt: skip
    else:
        experiment(a.model, a.rounds, a.local_steps, a.max_train, a.max_eval)


if __name__ == "__main__":
    main()
