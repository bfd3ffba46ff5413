#!/usr/bin/env python
"""Resumable driver of the experiment grid (all-MiniLM-L6-v2 on GLUE; see ``docs/fidelity.md``).

Grid: tasks {SST-2, QNLI, MRPC, RTE} × Dirichlet α {0.5, 0.1} × ranks {het = [2,4,8,16] cycled
over the clients, hom = 8; also het-rev = het's ranks in reverse client order} × participation
{1.0, 0.3} × seeds; 10 clients; every method that supports the setting (the others are listed
as unsupported in the report, or run with zero-padding under ``--pad``) plus the centralized
reference. Each setting is one ``glora compare`` report under ``<results>/<setting>/`` (small
files: tables, plot, report.md); the run directories (checkpoints, adapters) go under
``<runs>/<setting>/``. Re-running the same command skips finished runs and resumes interrupted
ones; a finished run whose run directory is gone (a fresh clone) is skipped when the report's
``records/`` keeps it with the same config, so more methods or seeds can be added later.

Examples (a budget-shaped subset, then the GLoRA server-rank ablation)::

    python scripts/experiments.py grid --tasks sst2 --alphas 0.5 --ranks het --participation 0.3 \\
        --seeds 0 --rounds 5 --local-steps 10 --max-train 2000 --max-eval 500
    python scripts/experiments.py ablation --tasks sst2 --alphas 0.5 --ranks het \\
        --participation 0.3 --seeds 0 --rounds 5 --local-steps 10 --max-train 2000
    python scripts/experiments.py grid ... --dry-run          # list the runs, run nothing
    python scripts/experiments.py dump-updates CONFIG --rounds 2 --out updates/  # for fidelity
    python scripts/experiments.py summarize --results docs/results   # one table, all settings
    python scripts/experiments.py lr-table --results docs/results/p1-r15 \\
        docs/results/p1-r15-lr3e-3 --setting sst2-a0.5-het-p1   # best lr per method
    python scripts/experiments.py spectrum runs/experiments/<setting>/glora-seed0   # ΔW spectrum
    python scripts/experiments.py spectrum RUN_DIR --rounds 5,10,20   # per checkpointed round
    python scripts/experiments.py clients RUN_DIR   # each client's rank, examples, label shares
    python scripts/experiments.py trace RUN_DIR --rounds 5,15   # split a replayed round's change

Every command prints its wall time; ``<results>/index.md`` lists every setting with its cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glora import aggregators
from glora.compare import MethodSpec, paired_differences, parse_methods, run_compare
from glora.fileio import write_text_atomic

HET_RANKS = [2, 4, 8, 16]
HOM_RANK = 8
#: ``--ranks`` regimes: ``het`` cycles ``HET_RANKS`` over the clients, ``hom`` gives every client
#: ``HOM_RANK``, ``het-rev`` gives the clients ``het``'s ranks in reverse client order (client
#: ``i`` gets client ``n-1-i``'s): the same ranks, held by other clients, to tell an effect of
#: rank heterogeneity from one of which clients hold the large ranks.
RANK_REGIMES = ("het", "het-rev", "hom")
DEFAULT_DATA = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _regime(ranks: str, clients: int) -> list[int] | int:
    """The ``federation.ranks`` of a ``--ranks`` regime (SystemExit naming the valid ones).

    ``het`` is the 4-cycle (the config cycles it), ``het-rev`` the full per-client list."""
    if ranks not in RANK_REGIMES:
        raise SystemExit(f"--ranks takes {', '.join(RANK_REGIMES)}, got {ranks!r}")
    if ranks == "hom":
        return HOM_RANK
    if ranks == "het":
        return list(HET_RANKS)
    return [HET_RANKS[(clients - 1 - i) % len(HET_RANKS)] for i in range(clients)]


def setting_name(task: str, alpha: float, ranks: str, participation: float) -> str:
    """Directory name of one setting, e.g. ``sst2-a0.5-het-p0.3``."""
    return f"{task}-a{alpha:g}-{ranks}-p{participation:g}"


def base_config(args: argparse.Namespace, task: str, alpha: float, ranks: str, part: float) -> dict:
    """The shared config of one setting (method and seed are set per run by compare), with
    ``--set dotted.key=value`` overrides applied last."""
    from glora.config import ConfigError, apply_overrides

    data: dict[str, Any] = {"task": task, "dir": args.data_dir}
    if args.max_train:
        data["max_train_examples"] = args.max_train
    if args.max_eval:
        data["max_eval_examples"] = args.max_eval
    raw = {
        "name": setting_name(task, alpha, ranks, part),
        "seed": 0,
        "model": {"name": args.model, "max_length": args.max_length},
        "data": data,
        "federation": {
            "clients": args.clients,
            "partition": "dirichlet",
            "alpha": alpha,
            "ranks": _regime(ranks, args.clients),
            "participation": part,
        },
        "method": {"name": "glora"},
        "training": {
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "device": args.device,
            "eval_every": args.eval_every,
        },
    }
    try:
        return apply_overrides(raw, getattr(args, "set", None) or [])
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def method_specs(text: str) -> list[MethodSpec]:
    """``all`` = every registered aggregator; otherwise a ``parse_methods`` string."""
    if text == "all":
        return [MethodSpec(n, n) for n in aggregators.available()]
    return parse_methods(text)


def ablation_specs(ranks: str, clients: int, modes: Sequence[str]) -> list[MethodSpec]:
    """GLoRA with server rank R ∈ {max client rank, 2×, Σ ranks, auto}.

    ``sum`` passes the sum of all client ranks; GLoRA caps R at the round's ``S = Σ r_i``, so it
    is the exact setting for every round.
    """
    from glora.config import FederationConfig

    client_ranks = FederationConfig(clients=clients, ranks=_regime(ranks, clients)).client_ranks(0)
    r_max = max(client_ranks)
    table = {
        "max": ("glora (R=r_max)", None),
        "2x": ("glora (R=2·r_max)", 2 * r_max),
        "sum": ("glora (R=Σr)", sum(client_ranks)),
        "auto": ("glora (R=auto)", "auto"),
    }
    out = []
    for mode in modes:
        if mode not in table:
            raise SystemExit(f"unknown server-rank mode {mode!r}; choose from {', '.join(table)}")
        label, value = table[mode]
        out.append(MethodSpec(label, "glora", {} if value is None else {"server_rank": value}))
    return out


def run_grid(args: argparse.Namespace, ablation: bool) -> int:
    """Run every setting of the grid through ``run_compare``; print and index the wall time."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for task in _strs(args.tasks):
        for alpha in _floats(args.alphas):
            for ranks in _strs(args.ranks):
                _regime(ranks, args.clients)  # a clear error before anything runs
                for part in _floats(args.participation):
                    name = setting_name(task, alpha, ranks, part)
                    if ablation:
                        name += "-ablation-R"
                        specs = ablation_specs(ranks, args.clients, _strs(args.server_ranks))
                        centralized = False
                    else:
                        specs = method_specs(args.methods)
                        centralized = not args.no_centralized
                    base = base_config(args, task, alpha, ranks, part)
                    seeds = _ints(args.seeds)
                    labels = [s.label for s in specs] + (["centralized"] if centralized else [])
                    print(f"== {name}: {len(labels)} methods × seeds {seeds}: {', '.join(labels)}")
                    if args.dry_run:
                        continue
                    t0 = time.perf_counter()
                    try:
                        outcomes = run_compare(
                            base,
                            specs,
                            seeds,
                            results / name,
                            resume=True,
                            pad=args.pad,
                            centralized=centralized,
                            runs_dir=Path(args.runs) / name,
                        )
                    except (ValueError, FileExistsError) as exc:  # e.g. runs of another lr
                        raise SystemExit(f"error in {name}: {exc}") from None
                    wall = time.perf_counter() - t0
                    total += wall
                    run_wall = sum(o.wall_seconds for o in outcomes)
                    done = sum(o.status == "done" for o in outcomes)
                    entry = {
                        "runs_done": done,
                        "runs": len(outcomes),
                        "wall_seconds_all_runs": round(run_wall, 1),
                        "rounds": args.rounds,
                        "local_steps": args.local_steps,
                        "lr": args.lr,
                        "max_train": args.max_train,
                        "max_eval": args.max_eval,
                        "seeds": seeds,
                    }
                    print(
                        f"== {name}: {done}/{len(outcomes)} runs done; this call {wall:.1f} s, "
                        f"all runs {run_wall:.1f} s; report {results / name / 'report.md'}"
                    )
                    _update_index(results, name, entry)
    if not args.dry_run:
        print(f"total wall time of this call: {total:.1f} s")
    return 0


def _update_index(results: Path, name: str, entry: dict[str, Any]) -> None:
    """Set ``name``'s entry of ``results/index.json`` (and ``index.md``), re-reading the file
    first: two grid processes on other settings of one results directory keep each other's
    entries (each writes only after a whole setting, a few seconds apart at the closest)."""
    path = results / "index.json"
    index: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    index[name] = entry
    _write_index(results, index)


def _write_index(results: Path, index: dict[str, Any]) -> None:
    write_text_atomic(results / "index.json", json.dumps(index, indent=2) + "\n")
    lines = [
        "# Experiment results",
        "",
        "| setting | runs done | wall s (all runs) | rounds × local steps "
        "| max train / eval | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in sorted(index.items()):
        lines.append(
            f"| [{name}]({name}/report.md) | {e['runs_done']}/{e['runs']} "
            f"| {e['wall_seconds_all_runs']} | {e['rounds']} × {e['local_steps']} "
            f"| {e['max_train']} / {e['max_eval']} | {e['seeds']} |"
        )
    (results / "index.md").write_text("\n".join(lines) + "\n")


def _read_finals(per_seed_csv: Path) -> dict[str, dict[int, float]]:
    """``{method: {seed: final metric}}`` from a compare report's ``per_seed.csv``."""
    finals: dict[str, dict[int, float]] = {}
    for r in csv.DictReader(per_seed_csv.open(encoding="utf-8")):
        finals.setdefault(r["method"], {})[int(r["seed"])] = float(r["final"])
    return finals


def _paired_cell(row: dict[str, Any]) -> str:
    """One :func:`paired_differences` row as ``+d ± sd (better/seeds, p P)``."""
    pv = "" if math.isnan(row["p_value"]) else f", p {row['p_value']:.2f}"
    return f"{row['diff_mean']:+.3f} ± {row['diff_std']:.3f} ({row['better']}/{row['seeds']}{pv})"


def summarize(args: argparse.Namespace) -> int:
    """One table over every setting of a results directory: final metric per method (mean ± std
    over seeds) and each method's seed-paired difference from the setting's reference (GLoRA),
    with its paired t-test p-value, from the settings' ``table.csv``, ``per_seed.csv`` and
    ``paired.csv`` (for the reference); written to ``<results>/summary.md`` and printed.
    The metrics of the grid (GLUE accuracy, F1) are higher-is-better."""
    results = Path(args.results)
    settings = sorted(p.parent.name for p in results.glob("*/table.csv"))
    if not settings:
        raise SystemExit(f"no <setting>/table.csv under {results}: run the grid first")
    finals: dict[str, dict[str, str]] = {}
    paired: dict[str, dict[str, str]] = {}
    for name in settings:
        for r in csv.DictReader((results / name / "table.csv").open(encoding="utf-8")):
            if int(r["seeds_done"]):
                cell = f"{float(r['final_mean']):.3f} ± {float(r['final_std']):.3f}"
                finals.setdefault(r["method"], {})[name] = f"{cell} ({r['seeds_done']})"
        p, ps = results / name / "paired.csv", results / name / "per_seed.csv"
        if not (p.is_file() and ps.is_file()):
            continue
        refs = {r["reference"] for r in csv.DictReader(p.open(encoding="utf-8"))}
        for r in paired_differences(_read_finals(ps), refs.pop()) if len(refs) == 1 else []:
            if r["seeds"]:
                paired.setdefault(r["method"], {})[name] = _paired_cell(r)

    def table(rows: dict[str, dict[str, str]]) -> list[str]:
        out = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
        for method, cells in rows.items():
            out.append(f"| {method} | " + " | ".join(cells.get(n, "–") for n in settings) + " |")
        return out

    lines = [
        f"# Summary of {results}",
        "",
        "Final primary metric, mean ± std over seeds (number of seeds):",
        "",
        *table(finals),
        "",
        "Seed-paired difference of the final metric from the reference method of each setting "
        "(GLoRA, or GLoRA at R = r_max in an ablation): mean ± std (seeds better / seeds, "
        "two-sided paired t-test p):",
        "",
        *table(paired),
        "",
    ]
    text = "\n".join(lines)
    (results / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def lr_table(args: argparse.Namespace) -> int:
    """One setting run at several learning rates: each method's final metric per lr and its
    best lr, then every method at its best lr against the reference (GLoRA) at its own.

    ``args.results`` are grid ``--results`` directories that differ only in ``--lr`` (read from
    their ``index.json``); ``args.setting`` names the setting in each. Per method and lr: mean ±
    std over seeds of ``per_seed.csv``'s final metric (number of seeds). The best lr is the one
    with the highest mean (the metrics of the grid are higher-is-better) among the lrs where the
    method finished all the seeds the others did; the same seeds give the same splits, ranks
    and client sampling at every lr, so the best-lr comparison is seed-paired. The lr is picked
    on the same evaluation subset the table reports, an optimistic choice made alike for every
    method. Written to ``args.out`` when given, and printed."""
    by_lr: dict[float, dict[str, dict[int, float]]] = {}
    for directory in args.results:
        root = Path(directory)
        index = (
            json.loads((root / "index.json").read_text()) if (root / "index.json").is_file() else {}
        )
        seeds_csv = root / args.setting / "per_seed.csv"
        if args.setting not in index or not seeds_csv.is_file():
            raise SystemExit(
                f"{root} has no finished setting {args.setting!r} (index.json and "
                f"{args.setting}/per_seed.csv): run the grid there first, or drop it"
            )
        lr = float(index[args.setting]["lr"])
        if lr in by_lr:
            raise SystemExit(f"two results directories ran {args.setting} at lr {lr:g}: keep one")
        by_lr[lr] = _read_finals(seeds_csv)
    lrs = sorted(by_lr)
    methods = list(dict.fromkeys(m for lr in lrs for m in by_lr[lr]))
    if args.reference not in methods:
        raise SystemExit(f"the reference {args.reference!r} was not run; methods: {methods}")
    want = max(len(s) for lr in lrs for s in by_lr[lr].values())
    ran = {m: sum(m in by_lr[lr] for lr in lrs) for m in methods}

    def cell(values: Sequence[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"

    best: dict[str, float] = {}
    lines = [
        f"# {args.setting} at several learning rates",
        "",
        "Final primary metric, mean ± std over seeds (number of seeds); **bold** = the method's "
        "best lr (highest mean over all seeds; a method run at one lr had no search). The lr is "
        "picked on the evaluation subset the table reports, alike for every method:",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | lrs run |",
        "|---" * (len(lrs) + 3) + "|",
    ]
    for m in methods:
        full = [lr for lr in lrs if len(by_lr[lr].get(m, {})) == want]
        if full:
            best[m] = max(full, key=lambda lr: sum(by_lr[lr][m].values()))
        cells = []
        for lr in lrs:
            runs = by_lr[lr].get(m)
            text = cell(list(runs.values())) if runs else "–"
            cells.append(f"**{text}**" if best.get(m) == lr else text)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best.get(m, math.nan):g} | {ran[m]} |")
    if args.reference in best:
        at_best = {m: by_lr[lr][m] for m, lr in best.items()}
        lines += [
            "",
            f"Each method at its best lr against {args.reference} at its best lr "
            f"({best[args.reference]:g}), seed-paired: mean ± std of the difference "
            "(seeds better / seeds, two-sided paired t-test p):",
            "",
            "| method | best lr | lrs run | difference |",
            "|---|---|---|---|",
        ]
        for r in paired_differences(at_best, args.reference):
            m = r["method"]
            lines.append(f"| {m} | {best[m]:g} | {ran[m]} | {_paired_cell(r)} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


def _top_shares(singular_values: Sequence[Sequence[float]], ks: Sequence[int]) -> list[float]:
    """Mean over modules of the share of ``‖ΔW‖²`` in the top ``k`` singular components."""

    def share(sv: Sequence[float], k: int) -> float:
        total = sum(x * x for x in sv)
        return sum(x * x for x in sv[:k]) / total if total else 0.0

    return [sum(share(sv, k) for sv in singular_values) / len(singular_values) for k in ks]


def _run_config(run: Path) -> Any:
    """The validated ``RunConfig`` of run directory ``run`` (SystemExit if it is not one)."""
    from glora.config import load_config

    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run}: no config.yaml here; pass a run directory (runs/<setting>/<run>)")
    return load_config(run / "config.yaml")


def _round_spectra(run: Path, rounds: Sequence[int]) -> list[dict[str, Any]]:
    """Per checkpointed round of ``run``: the global update's spectrum, loss and metric.

    Rebuilds the run's aggregator from its ``config.yaml``, loads each round's checkpointed
    server state and takes ``effective_update`` (factored, ``d×r`` and ``r×k`` per module) through
    :func:`glora.linalg.factored_svd`. Rounds without a checkpoint are skipped."""
    import torch

    from glora.linalg import factored_svd
    from glora.sim.rundir import RunDir
    from glora.tasks import build_task

    cfg = _run_config(run)
    primary = build_task(cfg).primary_metric()
    rd = RunDir(run)
    have = set(rd.checkpoint_rounds())
    records = {r["round"]: r for r in rd.read_metrics()}
    agg = aggregators.build(cfg.method.aggregator, **{"seed": cfg.seed, **cfg.method.options})
    out = []
    for t in rounds:
        if t not in have:
            continue
        ckpt = rd.load_checkpoint(t)
        agg.load_state(ckpt.state)
        svs = []
        for f in agg.effective_update(ckpt.state).values():
            _, S, _ = factored_svd(f.B.to(torch.float64), f.A.to(torch.float64))
            svs.append([float(s) for s in S])
        rec = records.get(t, {})
        metric = (rec.get("metrics") or {}).get(primary)
        out.append(
            {
                "round": t,
                "fro": math.sqrt(sum(x * x for sv in svs for x in sv)),
                "shares": _top_shares(svs, (1, 2, 4)),
                "train_loss": rec.get("train_loss"),
                "metric": metric,
            }
        )
    return out


def spectrum(args: argparse.Namespace) -> int:
    """Print how a run's global adapter spreads its energy over singular components.

    For each run directory: ``‖ΔW‖_F`` over all modules and the mean over modules of the energy
    share of the top 1, 2 and 4 singular components (``glora inspect``'s factored SVD) of the
    final adapter; with ``--rounds``, of the checkpointed global update at each of those rounds,
    beside the round's mean client training loss and the task's primary metric (blank if the
    round was not evaluated)."""
    from glora.cli.aggregate import inspect_adapter

    if args.rounds:
        rounds = _ints(args.rounds)
        print(
            "| run | round | ‖ΔW‖_F (all modules) | top-1 share | top-2 share | top-4 share "
            "| train loss | metric |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for run in args.runs:
            rows = _round_spectra(Path(run), rounds)
            if not rows:
                raise SystemExit(f"{run}: no checkpoint of rounds {args.rounds}")
            for r in rows:
                loss = "" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
                metric = "" if r["metric"] is None else f"{r['metric']:.3f}"
                print(
                    f"| {run} | {r['round']} | {r['fro']:.2f} | "
                    + " | ".join(f"{t:.3f}" for t in r["shares"])
                    + f" | {loss} | {metric} |"
                )
        return 0
    print("| run | ‖ΔW‖_F (all modules) | top-1 share | top-2 share | top-4 share |")
    print("|---|---:|---:|---:|---:|")
    for run in args.runs:
        mods = inspect_adapter(Path(run) / "adapter")["modules"]
        fro = math.sqrt(sum(m["fro_norm"] ** 2 for m in mods))
        tops = _top_shares([m["singular_values"] for m in mods], (1, 2, 4))
        print(f"| {run} | {fro:.2f} | " + " | ".join(f"{t:.3f}" for t in tops) + " |")
    return 0


def clients(args: argparse.Namespace) -> int:
    """Print each client of a run (rank, training examples, label shares) and the eval set.

    Reads the run's ``config.yaml`` and rebuilds its split with the engine's own
    :func:`glora.sim.engine.client_partition` (no model is loaded). Label shares are printed
    for tasks with at most 10 distinct labels (classification), else only the counts."""
    from collections import Counter

    from glora.sim.engine import client_partition
    from glora.tasks import build_task

    for run in args.runs:
        cfg = _run_config(Path(run))
        task = build_task(cfg)
        task.load()
        examples = list(task.train_examples())
        labels = [getattr(e, "label", None) for e in examples]
        values = sorted({x for x in labels if x is not None}, key=str)
        show = 0 < len(values) <= 10
        ranks = cfg.effective_federation()[1]
        head = "| client | rank | examples |" + "".join(f" label {v} |" for v in values if show)
        print(f"{run}\n\n{head}\n|" + "---:|" * (3 + (len(values) if show else 0)))
        for i, idx in enumerate(client_partition(cfg, task, len(examples))):
            counts = Counter(labels[j] for j in idx)
            shares = "".join(f" {counts[v] / len(idx):.2f} |" for v in values) if show else ""
            print(f"| {i} | {ranks[i]} | {len(idx)} |{shares}")
        dev = list(task.eval_examples()) if hasattr(task, "eval_examples") else []
        if dev:  # the (capped) evaluation set, for what one-class predictions score
            counts = Counter(getattr(e, "label", None) for e in dev)
            shares = "".join(f" {counts[v] / len(dev):.2f} |" for v in values) if show else ""
            print(f"| eval | – | {len(dev)} |{shares}")
        print()
    return 0


def dump_updates(args: argparse.Namespace) -> int:
    """Run one config with the simulator and save the given rounds' client updates."""
    from glora.bench.fidelity import capture_updates
    from glora.config import load_config
    from glora.sim.engine import Simulation

    cfg = load_config(args.config, args.set or [])
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    capture_updates(sim, args.out, _ints(args.rounds) if args.rounds else None)
    last = max(_ints(args.rounds)) if args.rounds else cfg.training.rounds
    for t in range(1, min(last, cfg.training.rounds) + 1):
        sim.run_round(t)
    print(f"saved updates under {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _dense(factors: Any) -> dict[str, Any]:
    """``B @ A`` of each module of a ``{module: LoRAFactors}`` mapping, float64 (``d×k``)."""
    return {m: f.B.double() @ f.A.double() for m, f in factors.items()}


def _dot(x: Any, y: Any) -> float:
    """``Σ_m ⟨x[m], y[m]⟩_F`` over the modules of two dicts of dense tensors."""
    return float(sum((x[m] * y[m]).sum() for m in x))


def trace_round(sim: Any, t: int, probe: Sequence[Any]) -> dict[str, Any]:
    """Run round ``t`` of ``sim`` (restored at round ``t - 1``) and split its global change.

    With ``U`` the global update before the round (``d×k`` per module, float64), client ``i``
    of weight share ``p_i`` starting from ``S_i`` (its readout) and uploading ``V_i``, and
    ``U'`` the update after it, the round's change splits exactly into

    ``U' − U = Σ_i p_i (V_i − S_i)  +  Σ_i p_i (S_i − U)  +  (U' − Σ_i p_i V_i)``

    = each client's own change, the part of ``U`` the clients did not start from ("tail"), and
    what the server's rule adds to the exact average of the uploads ("server"). For each part:
    its Frobenius norm over all modules, its share ``⟨part, U' − U⟩ / ‖U' − U‖²`` (the shares
    add up to 1), and on the ``probe`` examples of a 2-class task the change it alone makes to
    the mean logit margin (label 1 − label 0) and to the share predicted label 1, from ``U``,
    with the round's new head for every evaluation. Dense ``d×k`` matrices are formed here:
    an analysis of small models, not part of any rule."""
    import torch

    agg = sim.agg
    unsupported = SystemExit(
        f"trace needs a rule whose clients keep no local factors and whose server merges "
        f"nothing into the base weights ({agg.name} does); e.g. glora, fedit, flexlora, hetlora"
    )
    if agg.client_plan(t).local or sim.state.base_delta:
        raise unsupported

    before = _dense(agg.effective_update(sim.state))
    seen: list[tuple[Any, Any]] = []
    sim.update_hook = lambda _t, start, update: seen.append((_dense(start), update))
    record = sim.run_round(t)
    sim.update_hook = None
    if sim.state.base_delta:  # e.g. FedEx-LoRA folds its residual into the base in round 1
        raise unsupported
    after = _dense(agg.effective_update(sim.state))
    total_w = sum(u.weight for _, u in seen)
    change = {m: after[m] - before[m] for m in before}
    parts: dict[str, dict[str, Any]] = {}
    exact = {m: torch.zeros_like(before[m]) for m in before}
    tail = {m: torch.zeros_like(before[m]) for m in before}
    labels = [getattr(e, "label", None) for e in sim.examples]
    info: dict[str, dict[str, Any]] = {}
    for start, u in seen:
        p = u.weight / total_w
        up = _dense(u.factors)
        parts[f"client {u.client_id}"] = {m: p * (up[m] - start[m]) for m in before}
        for m in before:
            exact[m] += p * up[m]
            tail[m] += p * (start[m] - before[m])
        idx = sim.client_indices[int(u.client_id)]
        ones = sum(labels[j] == 1 for j in idx) / len(idx)
        info[f"client {u.client_id}"] = {"rank": sim.ranks[int(u.client_id)], "p": p, "ones": ones}
    clients = list(parts)
    for name, one in (("label-0 clients", False), ("label-1 clients", True)):
        members = [k for k in clients if (info[k]["ones"] >= 0.5) == one]
        if members:
            parts[name] = {m: sum(parts[k][m] for k in members) for m in before}
            info[name] = {"p": sum(info[k]["p"] for k in members), "ones": None, "rank": None}
    parts["tail"] = tail
    parts["server"] = {m: after[m] - exact[m] for m in before}
    parts["total"] = change

    tok_task, model = sim.task, sim.model
    model.set_head(sim.head)

    def probe_margin(delta: dict[str, Any]) -> tuple[float, float]:
        model.set_base({m: (before[m] + delta[m]).float() for m in before})
        margins = []
        with torch.no_grad(), model.adapters_disabled():
            model.peft.eval()
            for i in range(0, len(probe), 64):
                batch = tok_task.collate(probe[i : i + 64])
                batch.pop("labels")
                logits = model.peft(**{k: v.to(sim.device) for k, v in batch.items()}).logits
                margins.append((logits[:, 1] - logits[:, 0]).double().cpu())
        mg = torch.cat(margins)
        return float(mg.mean()), float((mg > 0).double().mean())

    zero = {m: torch.zeros_like(before[m]) for m in before}
    base_margin, base_ones = probe_margin(zero)
    norm2 = _dot(change, change)
    rows = []
    for name, part in parts.items():
        mg, ones = probe_margin(part)
        rows.append(
            {
                "part": name,
                **info.get(name, {"rank": None, "p": None, "ones": None}),
                "norm": math.sqrt(_dot(part, part)),
                "share": _dot(part, change) / norm2 if norm2 else float("nan"),
                "margin": mg - base_margin,
                "pred_ones": ones - base_ones,
            }
        )
    model.set_base(None)
    return {
        "round": t,
        "train_loss": record.get("train_loss"),
        "margin": base_margin,
        "pred_ones": base_ones,
        "rows": rows,
        "after": after,
    }


def trace(args: argparse.Namespace) -> int:
    """Print, per requested round of each run, how the round's global change splits
    (:func:`trace_round`) and how closely the replayed round reproduces the checkpoint."""
    import torch

    from glora.sim.engine import Simulation
    from glora.sim.rundir import RunDir

    torch.set_num_threads(args.threads)
    for run in args.runs:
        cfg = _run_config(Path(run))
        rd = RunDir(run)
        have = set(rd.checkpoint_rounds())
        sim = Simulation(cfg)
        if getattr(getattr(sim.task, "spec", None), "num_labels", None) != 2:
            raise SystemExit(f"{run}: trace's probe needs a 2-class GLUE task")
        probe = list(sim.task.eval_examples())[: args.probe]
        fresh = True
        for t in _ints(args.rounds):
            if t - 1 not in have and t > 1:
                raise SystemExit(f"{run}: no checkpoint of round {t - 1} to replay round {t}")
            if t > 1:
                sim.restore(rd.load_checkpoint(t - 1))
            elif not fresh:
                sim = Simulation(cfg)
            fresh = False
            t0 = time.perf_counter()
            out = trace_round(sim, t, probe)
            check = ""
            if t in have:
                state = rd.load_checkpoint(t).state
                sim.agg.load_state(state)
                saved = _dense(sim.agg.effective_update(state))
                diff = {m: out["after"][m] - saved[m] for m in saved}
                rel = math.sqrt(_dot(diff, diff) / _dot(saved, saved))
                check = f"; replay vs checkpoint: relative difference {rel:.1e}"
            print(
                f"\n{run}, round {t} ({time.perf_counter() - t0:.0f} s): train loss "
                f"{out['train_loss']:.3f}; probe of {len(probe)} dev examples at U (new head): "
                f"margin {out['margin']:+.3f}, predicted label 1 {out['pred_ones']:.3f}{check}\n"
            )
            print(
                "| part | rank | weight | label-1 share | ‖part‖_F | share of ‖ΔU‖² "
                "| Δ margin | Δ predicted label 1 |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in out["rows"]:
                cells = [
                    "" if r["rank"] is None else str(r["rank"]),
                    "" if r["p"] is None else f"{r['p']:.3f}",
                    "" if r["ones"] is None else f"{r['ones']:.2f}",
                ]
                print(
                    f"| {r['part']} | " + " | ".join(cells) + f" | {r['norm']:.3f} | "
                    f"{r['share']:+.3f} | {r['margin']:+.3f} | {r['pred_ones']:+.3f} |"
                )
    return 0


def _grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="sst2,qnli,mrpc,rte")
    p.add_argument("--alphas", default="0.5,0.1", help="Dirichlet α values")
    p.add_argument(
        "--ranks",
        default="het,hom",
        help="het = [2,4,8,16] cycled, het-rev = het's ranks in reverse client order, hom = 8",
    )
    p.add_argument("--participation", default="1.0,0.3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N rounds (+ last)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--results", default="docs/results", help="small report files")
    p.add_argument("--runs", default="runs/experiments", help="run directories (large)")
    p.add_argument("--pad", action="store_true", help="zero-pad same-rank methods on het ranks")
    p.add_argument("--dry-run", action="store_true", help="list the settings, run nothing")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override of every run, e.g. training.use_rslora=true (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="the method comparison grid")
    _grid_options(g)
    g.add_argument("--methods", default="all", help="'all' or a compare --methods string")
    g.add_argument("--no-centralized", action="store_true")
    a = sub.add_parser("ablation", help="GLoRA server-rank ablation")
    _grid_options(a)
    a.add_argument("--server-ranks", default="max,2x,sum,auto")
    s = sub.add_parser("summarize", help="one table over every setting of a results directory")
    s.add_argument("--results", default="docs/results", help="the grid's --results directory")
    lt = sub.add_parser("lr-table", help="one setting at several lrs: best lr per method")
    lt.add_argument("--results", nargs="+", required=True, help="grid --results dirs, one per lr")
    lt.add_argument("--setting", required=True, help="e.g. sst2-a0.5-het-p1")
    lt.add_argument("--reference", default="glora")
    lt.add_argument("--out", default="", help="also write the table here (markdown)")
    sp = sub.add_parser("spectrum", help="energy share of top singular components per run")
    sp.add_argument("runs", nargs="+", help="run directories (with adapter/)")
    sp.add_argument("--rounds", default="", help="checkpointed rounds to read instead, e.g. 5,10")
    c = sub.add_parser("clients", help="each client of a run: rank, examples, label shares")
    c.add_argument("runs", nargs="+", help="run directories (with config.yaml)")
    tr = sub.add_parser("trace", help="replay rounds of a run; split each round's change")
    tr.add_argument("runs", nargs="+", help="run directories (with config.yaml, checkpoints)")
    tr.add_argument("--rounds", required=True, help="rounds to replay, e.g. 5,15 (needs t-1)")
    tr.add_argument("--probe", type=int, default=256, help="dev examples for the margin probe")
    tr.add_argument("--threads", type=int, default=2, help="torch threads")
    d = sub.add_parser("dump-updates", help="save client updates of a run for `bench fidelity`")
    d.add_argument("config")
    d.add_argument("--rounds", default="", help="rounds to save (default: all)")
    d.add_argument("--out", required=True)
    d.add_argument("--set", action="append", help="config override dotted.key=value")
    args = parser.parse_args(argv)
    if args.command == "dump-updates":
        return dump_updates(args)
    if args.command == "summarize":
        return summarize(args)
    if args.command == "lr-table":
        return lr_table(args)
    if args.command == "spectrum":
        return spectrum(args)
    if args.command == "clients":
        return clients(args)
    if args.command == "trace":
        return trace(args)
    return run_grid(args, ablation=args.command == "ablation")


if __name__ == "__main__":
    sys.exit(main())
