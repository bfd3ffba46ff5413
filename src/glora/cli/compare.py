"""`glora compare`: run several methods × seeds on one federation and write a report.

Hook: ``glora.cli`` calls :func:`register` on the top-level app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def compare(
    config: Annotated[
        Path, typer.Argument(help="Base run config (YAML); method and seed are replaced.")
    ],
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of methods; options in brackets, "
            "e.g. 'glora[server_rank=32;energy=0.9]'."
        ),
    ] = "glora,fedit",
    seeds: Annotated[str, typer.Option(help="Comma list of seeds.")] = "0",
    out: Annotated[
        Path | None, typer.Option(help="Report directory (default: compare/<config name>).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Skip finished runs, resume interrupted ones (refused for runs of another "
            "config, e.g. another lr).",
        ),
    ] = False,
    pad: Annotated[
        bool, typer.Option("--pad", help="Run same-rank methods with zero-padding on mixed ranks.")
    ] = False,
    centralized: Annotated[
        bool, typer.Option("--centralized", help="Add the centralized reference run.")
    ] = False,
    metric: Annotated[
        str | None, typer.Option(help="Primary metric (default: the task's).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Method label the report's seed-paired differences are taken against "
            "(default: glora if compared, else the first method)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override dotted.key=value (repeatable)."),
    ] = None,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only rewrite the report of an existing --out.")
    ] = False,
) -> None:
    """Compare aggregation methods on the same federation (same splits, ranks and sampling)."""
    from glora.compare import run_compare, write_report
    from glora.config import ConfigError

    out_dir = out or Path("compare") / config.stem
    if report_only:
        try:
            typer.echo(f"report: {write_report(out_dir, metric=metric, reference=reference)}")
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        return
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"seeds must be integers, got {seeds!r}", param_hint="--seeds"
        ) from None
    try:
        outcomes = run_compare(
            config,
            methods,
            seed_list,
            out_dir,
            resume=resume,
            pad=pad,
            centralized=centralized,
            overrides=set_ or [],
            metric=metric,
            log=typer.echo,
            reference=reference,
        )
    except (ConfigError, ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    done = sum(o.status == "done" for o in outcomes)
    typer.echo(f"{done}/{len(outcomes)} runs done; report: {out_dir / 'report.md'}")


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the top-level ``glora`` app."""
    app.command("compare")(compare)
