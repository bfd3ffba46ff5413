"""`glora bench fidelity`: exactness and gauge sensitivity of every aggregation rule.

Hook: ``glora.cli.bench`` calls :func:`register` on its ``bench`` typer sub-app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_DTYPES = ("float64", "float32")


def fidelity(
    homogeneous: Annotated[
        str,
        typer.Option(
            help="Ranks of the homogeneous random round ('8x4' = 4 clients of rank 8; '' = skip)."
        ),
    ] = "8x4",
    heterogeneous: Annotated[
        str, typer.Option(help="Ranks of the heterogeneous random round (comma list; '' = skip).")
    ] = "2,4,8,16",
    shapes: Annotated[
        str,
        typer.Option(
            help="Module shapes d×k of the random rounds, e.g. '48x32,40x64' (default: 3 modules)."
        ),
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed of the random updates.")] = 0,
    gauge_seed: Annotated[int, typer.Option(help="Seed of the random client gauges.")] = 1,
    drift: Annotated[
        float, typer.Option(help="Client drift from the shared start (random rounds).")
    ] = 1.0,
    cond: Annotated[
        float, typer.Option(help="Condition-number bound of the general gauges.")
    ] = 4.0,
    round: Annotated[
        int, typer.Option(help="Round number passed to client-side steps (FedRot alignment).")
    ] = 2,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    updates: Annotated[
        list[Path] | None,
        typer.Option(
            "--updates", help="Directory of saved client updates (repeatable); see save_updates."
        ),
    ] = None,
    no_random: Annotated[
        bool, typer.Option("--no-random", help="Only the --updates rounds.")
    ] = False,
    methods: Annotated[
        str, typer.Option(help="Comma list of methods/labels to keep (default: all).")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown tables.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON rows to this file.")] = None,
) -> None:
    """Relative error of each method's effective update against ΔW* = Σ p_i B̃_i A_i, and its
    change under random per-client orthogonal and general invertible gauges."""
    import torch
    from rich.console import Console

    from glora.bench import fidelity as fid

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {_DTYPES}", param_hint="--dtype")
    scenarios = fid.build_scenarios(
        homogeneous=homogeneous,
        heterogeneous=heterogeneous,
        shapes=fid.parse_shapes(shapes) if shapes else None,
        seed=seed,
        drift=drift,
        dtype=getattr(torch, dtype),
        updates_dirs=updates or [],
        random=not no_random,
    )
    if not scenarios:
        raise typer.BadParameter("nothing to evaluate: give --updates or drop --no-random")
    variants = fid.default_variants()
    if methods:
        keep = {m.strip() for m in methods.split(",") if m.strip()}
        variants = [v for v in variants if v.method in keep or v.label in keep]
    rows = fid.run_fidelity(scenarios, variants, gauge_seed=gauge_seed, cond=cond, round=round)
    data = fid.rows_to_json(rows)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    elif markdown:
        typer.echo(fid.markdown_table(rows))
    else:
        console = Console()
        for table in fid.render_table(rows):
            console.print(table)


def register(bench_app: typer.Typer, *, standalone: bool = False) -> None:
    """Add ``fidelity`` to the ``glora bench`` sub-app (or as the only command of ``bench_app``)."""
    if standalone:
        bench_app.command()(fidelity)
    else:
        bench_app.command("fidelity")(fidelity)
