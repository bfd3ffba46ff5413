"""The in-process federated LoRA simulator (``glora run``).

Entry points:

* :class:`~glora.sim.engine.Simulation`: the round loop on one frozen model (no files);
* :func:`run_experiment`: a whole run in a run directory (lock, overwrite protection, config,
  metrics, checkpoints, ``--resume``, final PEFT adapter);
* :class:`~glora.sim.rundir.RunDir`: the run-directory layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from glora.config import RunConfig, validate_config
from glora.sim.client import LossHook
from glora.sim.engine import Simulation
from glora.sim.rundir import RunDir, RunDirError

__all__ = [
    "ARITHMETIC_KEYS",
    "RESULT_KEYS",
    "RESUMABLE_KEYS",
    "RunDir",
    "RunDirError",
    "RunResult",
    "Simulation",
    "config_changes",
    "resumable_changes",
    "resume_config",
    "run_experiment",
]

#: Config keys that may differ between a run and its ``--resume`` (everything else must match).
RESUMABLE_KEYS = (
    "training.rounds",
    "training.eval_every",
    "training.checkpoint_every",
    "training.device",
    "training.num_threads",
    "training.eval_batch_size",
    "output.dir",
)
#: the resumable keys that change a run's arithmetic: a seed repeats a run bit for bit only on
#: the same device, thread count (the floating-point summation order) and evaluation batch size
ARITHMETIC_KEYS = ("training.device", "training.num_threads", "training.eval_batch_size")
#: the resumable keys that can change a run's reported results: its arithmetic, how many rounds
#: it ran and which rounds were evaluated
RESULT_KEYS = ("training.rounds", "training.eval_every", *ARITHMETIC_KEYS)


@dataclass
class RunResult:
    """What :func:`run_experiment` returns: the run directory and all its round records."""

    run_dir: Path
    records: list[dict[str, Any]]
    simulation: Simulation


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: RunConfig, new: RunConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted config keys on which ``new`` differs from ``saved``, sorted, leaving out
    ``name``, :data:`RESUMABLE_KEYS` and ``ignore`` (empty: ``new`` may resume or reuse
    ``saved``'s run)."""
    a, b = _flatten(saved.to_yaml_dict()), _flatten(new.to_yaml_dict())
    skip = {"name", *RESUMABLE_KEYS, *ignore}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in skip)


def resumable_changes(
    saved: RunConfig, new: RunConfig, keys: tuple[str, ...] = RESULT_KEYS
) -> list[str]:
    """The ``keys`` (by default every resumable key that can change a run's results) on which
    ``new`` differs from ``saved``, each as ``"key old → new"``, in the order of ``keys``.

    A resume or a reused finished run may differ on :data:`RESUMABLE_KEYS`; callers name these
    differences so that a run computed (or evaluated) under two settings is never silent.
    """
    a, b = _flatten(saved.to_yaml_dict()), _flatten(new.to_yaml_dict())
    return [f"{k} {a.get(k)} → {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


def resume_config(run_dir: str | Path, new: RunConfig | None = None) -> RunConfig:
    """The config to resume ``run_dir`` with: its saved config, or ``new`` when compatible.

    ``new`` may change only :data:`RESUMABLE_KEYS` (e.g. more rounds); its output location is
    set to ``run_dir``.
    """
    rd = RunDir(run_dir)
    saved = validate_config(rd.read_config())
    cfg = new or saved
    cfg = cfg.model_copy(
        update={
            "name": rd.path.name,
            "output": cfg.output.model_copy(update={"dir": str(rd.path.parent)}),
        }
    )
    diff = config_changes(saved, cfg)
    if diff:
        raise RunDirError(
            f"cannot resume {str(rd.path)!r} with a different configuration ({', '.join(diff)} "
            f"changed); only {', '.join(RESUMABLE_KEYS)} may change"
        )
    return cfg


def run_experiment(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    progress: Progress | None = None,
    loss_hook: LossHook | None = None,
) -> RunResult:
    """Run ``config`` in ``output.dir/<name>/`` (see :mod:`glora.sim.rundir` for the layout).

    Args:
        resume: continue from the latest complete checkpoint (``metrics.jsonl`` is truncated to
            it); the result is bit-identical to an uninterrupted run on the same
            :data:`ARITHMETIC_KEYS` (a change of those is printed).
        overwrite: replace a run that is already in the directory.

    Raises:
        RunDirError: the directory is locked, holds a run (without ``resume``/``overwrite``) or
            has no checkpoint to resume from.
    """
    rd = RunDir(config.run_dir)
    with rd:
        ckpt = None
        changed: list[str] = []
        if resume:
            ckpt = rd.load_checkpoint()
            changed = resumable_changes(
                validate_config(rd.read_config()), config, keys=ARITHMETIC_KEYS
            )
        elif rd.holds_run() and not overwrite:
            raise RunDirError(
                f"{str(rd.path)!r} already holds a run; pass --overwrite to replace it, "
                "--resume to continue it, or choose another name"
            )
        # build everything (model, data) before touching the directory's contents
        sim = Simulation(
            config, run_dir=rd, console=console, progress=progress, loss_hook=loss_hook
        )
        if ckpt is not None:
            rd.truncate_metrics(ckpt.round)
        elif overwrite and rd.holds_run():
            rd.clear()
        rd.write_config(config.to_yaml_dict())
        if ckpt is not None:
            sim.restore(ckpt)
            if console is not None:
                console.print(f"resuming {rd.path} after round {ckpt.round}")
                if changed:
                    console.print(
                        f"note: {', '.join(changed)} from round {ckpt.round + 1}: the run will "
                        "not repeat an uninterrupted one bit for bit"
                    )
        sim.run()
        return RunResult(rd.path, rd.read_metrics(), sim)
