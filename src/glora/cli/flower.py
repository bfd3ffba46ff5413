"""``glora flower run CONFIG``: the ``glora run`` federation on Flower (localhost processes)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

__all__ = ["register", "run"]

flower_app = typer.Typer(
    name="flower",
    help="Run glora federations on Flower (SuperLink + SuperNodes on 127.0.0.1).",
    no_args_is_help=True,
)


@flower_app.command("run")
def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run configuration (the one of `glora run`).")
    ] = None,
    supernodes: Annotated[
        int | None,
        typer.Option("--supernodes", "-n", help="SuperNodes to start (default: the clients)."),
    ] = None,
    runtime: Annotated[
        str, typer.Option("--runtime", help="deployment (real processes) or simulation.")
    ] = "deployment",
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in RUN_DIR.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in the run directory.")
    ] = False,
    tls: Annotated[
        bool, typer.Option("--tls", help="TLS between SuperNodes and SuperLink (generated CA).")
    ] = False,
    auth: Annotated[
        bool, typer.Option("--auth", help="SuperNode authentication (generated EC keys).")
    ] = False,
    min_replies: Annotated[
        int, typer.Option("--min-replies", help="Skip a round with fewer valid replies.")
    ] = 1,
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds a round waits for replies.")
    ] = 600.0,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep FLWR_HOME, logs, certificates here (default: temp)."),
    ] = None,
) -> None:
    """Start SuperLink + N SuperNodes, run CONFIG's federation, stop every process by PID."""
    from rich.console import Console

    from glora.config import ConfigError, load_config
    from glora.flower.launch import APP_DIR, FederationError, LocalFederation, handle_signals
    from glora.flower.launch import run_simulation as sim_run
    from glora.sim import RunDir, RunDirError, resume_config

    err = Console(stderr=True)
    console = Console()
    config_tmp: Path | None = None  # the resolved copy of CONFIG handed to Flower's processes
    try:
        if runtime not in ("deployment", "simulation"):
            raise ConfigError("--runtime must be deployment or simulation")
        if resume is not None and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if resume is not None:
            config_path = (Path(resume) / "config.yaml").resolve()
            cfg = resume_config(resume)
            # fail early (exit 2) if the run is in use or no checkpoint verifies (the ServerApp
            # loads it again, under the lock too)
            with RunDir(cfg.run_dir) as rd:
                rd.load_checkpoint()
        elif config is None:
            raise ConfigError("give a CONFIG.yaml (or --resume RUN_DIR)")
        else:
            cfg = load_config(Path(config).resolve())
            if RunDir(cfg.run_dir).holds_run() and not overwrite:
                raise RunDirError(
                    f"{str(cfg.run_dir)!r} already holds a run; pass --overwrite to replace it, "
                    "--resume to continue it, or choose another name"
                )
            # Flower's processes run in their own working directory: hand them a copy of the
            # config whose data.dir is resolved against the user's current directory.
            cfg = cfg.with_resolved_paths()
            config_tmp = Path(tempfile.mkdtemp(prefix="glora-flower-config-"))
            config_path = config_tmp / "config.yaml"
            config_path.write_text(yaml.safe_dump(cfg.to_yaml_dict()), encoding="utf-8")
        if (tls or auth) and runtime == "simulation":
            raise ConfigError("--tls/--auth apply to the deployment runtime only")
        n = supernodes or cfg.effective_federation()[0]
        run_dir = Path(cfg.run_dir).resolve()
        run_config = {
            "config": str(config_path),
            "run-dir": str(run_dir),
            "resume": resume is not None,
            "overwrite": overwrite,
            "min-replies": min_replies,
            "round-timeout": float(round_timeout),
        }
        t0 = time.perf_counter()
        with handle_signals():
            if runtime == "simulation":
                rc = sim_run(APP_DIR, run_config, n, workdir=workdir)
            else:
                with LocalFederation(n, workdir=workdir, tls=tls, auth=auth) as fed:
                    console.print(
                        f"SuperLink 127.0.0.1:{fed.port}, {n} SuperNodes, PIDs {fed.pids()}"
                    )
                    rc = fed.run(APP_DIR, run_config)
                    if rc != 0:
                        err.print(fed.logs()[-8000:], highlight=False, markup=False)
        if rc != 0 or not (run_dir / "adapter").exists():
            raise FederationError(f"the Flower run failed (flwr run exit code {rc})")
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/bold red]: every Flower process was stopped")
        raise typer.Exit(130) from None
    except (ConfigError, RunDirError, FederationError, ValueError) as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        if config_tmp is not None:  # every Flower process has stopped by now
            shutil.rmtree(config_tmp, ignore_errors=True)
    console.print(f"run directory: {run_dir} ({time.perf_counter() - t0:.1f} s)")


def register(app: typer.Typer) -> None:
    """Add ``glora flower run`` to ``app``."""
    app.add_typer(flower_app, name="flower")
