"""``glora run CONFIG.yaml``: a federated LoRA simulation (see :mod:`glora.sim`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = ["register", "run", "summary_table"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def summary_table(records: list[dict[str, Any]], metric: str) -> Table:
    """A rich table: round, train loss, the primary metric, bytes up/down, server seconds."""
    table = Table(title="glora run summary")
    for col in ("round", "train loss", metric, "personalized", "up", "down", "server s", "dropped"):
        table.add_column(col, justify="right")
    for r in records:
        m = r.get("metrics", {})
        val = m.get(metric)
        pers = (m.get("personalized") or {}).get(metric)
        loss = r.get("train_loss", float("nan"))
        table.add_row(
            str(r["round"]),
            "-"
            if loss is None or (isinstance(loss, float) and math.isnan(loss))
            else f"{loss:.4f}",
            "-" if val is None else f"{val:.4f}",
            "-" if pers is None else f"{pers:.4f}",
            _fmt_bytes(r.get("bytes_up", 0)),
            _fmt_bytes(r.get("bytes_down", 0)),
            f"{r.get('server_seconds', 0.0):.3f}",
            str(len(r.get("dropped", {}))),
        )
    return table


def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run configuration (optional with --resume).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: dotted.key=value (repeatable)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in RUN_DIR from its latest checkpoint."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in the output directory.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or tables.")] = False,
) -> None:
    """Run an in-process federated LoRA simulation with real PEFT training."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from glora.config import ConfigError, apply_overrides, read_raw, validate_config
    from glora.sim import RunDirError, resume_config, run_experiment
    from glora.sim.model import ModelNotFoundError
    from glora.tasks import TaskError

    err = Console(stderr=True, soft_wrap=True)
    console = None if quiet else Console()
    try:
        if resume is not None and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if config is None and resume is None:
            raise ConfigError("give a CONFIG.yaml (or --resume RUN_DIR)")
        if config is not None:
            raw = read_raw(config)
        else:
            from glora.sim.rundir import RunDir

            raw = RunDir(resume).read_config()  # type: ignore[arg-type]
        cfg = validate_config(apply_overrides(raw, set_ or []))
        if resume is not None:
            cfg = resume_config(resume, cfg)
        progress = None
        if console is not None:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
        if progress is not None:
            with progress:
                result = run_experiment(
                    cfg,
                    resume=resume is not None,
                    overwrite=overwrite,
                    console=console,
                    progress=progress,
                )
        else:
            result = run_experiment(cfg, resume=resume is not None, overwrite=overwrite)
    except (ConfigError, TaskError, RunDirError, ModelNotFoundError) as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(2) from None
    except ValueError as exc:  # bad federation/model settings found while building the run
        err.print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(2) from None
    if console is not None:
        console.print(summary_table(result.records, result.simulation.task.primary_metric()))
        console.print(f"run directory: {result.run_dir}")


def register(app: typer.Typer) -> None:
    """Add ``glora run`` to ``app``."""
    app.command("run")(run)
