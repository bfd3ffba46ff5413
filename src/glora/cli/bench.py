"""``glora bench``: benchmarks of the aggregation core (one command per function).

Each benchmark is one command of the ``bench`` sub-app. To add one, either decorate a function
here with ``@bench_app.command("name")``, or write a module with ``register(bench_app)`` and list
it in :data:`_EXTENSIONS` (``glora.cli.bench_fidelity`` adds ``glora bench fidelity`` that way).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

__all__ = ["aggregation", "bench_app", "register"]

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks of the server aggregation rules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules that add commands to :data:`bench_app` through their own ``register(bench_app)``.
_EXTENSIONS: tuple[str, ...] = ("glora.cli.bench_fidelity",)


def _parse_int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise typer.BadParameter("expected at least one value", param_hint=option)
    return values


def _parse_set(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["glora.consensus=gram"]`` → ``{"glora": {"consensus": "gram"}}`` (YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise typer.BadParameter(
                f"expected METHOD.OPTION=VALUE, got {item!r}", param_hint="--set"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"{item!r}: {exc}", param_hint="--set") from None
        out.setdefault(method, {})[name] = value
    return out


def _invocation() -> str | None:
    """The command line this process was started with (``None`` when not from a shell)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == "glora":
        return shlex.join(["glora", *sys.argv[1:]])
    if argv0 == "aggregation.py":
        return shlex.join(["python", "-m", "glora.bench.aggregation", *sys.argv[1:]])
    return None


@bench_app.command("aggregation")
def aggregation(
    modules: Annotated[int, typer.Option("--modules", help="Number of LoRA modules.")] = 128,
    d: Annotated[int, typer.Option("--d", help="Output features d of every module.")] = 4096,
    k: Annotated[int, typer.Option("--k", help="Input features k of every module.")] = 4096,
    clients: Annotated[int, typer.Option("--clients", help="Clients in the round.")] = 20,
    ranks: Annotated[
        str, typer.Option("--ranks", help="Client ranks are drawn (seeded) from these.")
    ] = "4,8,16",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float64.")] = "float32",
    methods: Annotated[
        str,
        typer.Option(
            "--methods", help="Comma list of registry names, or 'all' (every built-in rule)."
        ),
    ] = "all",
    repeats: Annotated[
        int, typer.Option("--repeats", help="Rounds per method; the median time is reported.")
    ] = 3,
    flexlora_modules: Annotated[
        int,
        typer.Option("--flexlora-modules", help="Modules FlexLoRA (dense d×k + SVD) runs on."),
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of ranks, weights, factors.")] = 0,
    threads: Annotated[
        int, typer.Option("--threads", help="Torch threads (0 = all available cores).")
    ] = 0,
    set_options: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Method option METHOD.OPTION=VALUE, e.g. glora.consensus=gram (repeatable).",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds allowed per method (default: none).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report as JSON here.")
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Also print the tables as Markdown.")
    ] = False,
) -> None:
    """Server time and peak extra memory of one aggregation round per method.

    Every method runs in a fresh subprocess on the same seeded random client updates; the round
    is aggregate + one readout per distinct client rank. Same-rank methods run with pad=True.
    """
    from rich.console import Console

    from glora.bench import aggregation as bench

    method_list = (
        bench.DEFAULT_METHODS
        if methods.strip() == "all"
        else tuple(m.strip() for m in methods.split(",") if m.strip())
    )
    try:
        config = bench.BenchConfig(
            modules=modules,
            d=d,
            k=k,
            clients=clients,
            ranks=_parse_int_list(ranks, "--ranks"),
            dtype=dtype,
            methods=method_list,
            repeats=repeats,
            flexlora_modules=flexlora_modules,
            seed=seed,
            threads=threads or len(os.sched_getaffinity(0)),
            options=_parse_set(set_options),
            timeout=timeout,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console()
    console.print(f"torch threads per method: {config.threads}")
    report = bench.run_benchmark(
        config,
        command=_invocation(),
        progress=lambda msg: console.print(f"[dim]{msg}[/dim]"),
    )
    bench.render_report(report, console)
    if markdown:
        typer.echo(bench.markdown_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"report written to {json_out}")


def _load_extensions() -> None:
    for name in _EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(bench_app)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` sub-app (all its commands) to ``app``."""
    app.add_typer(bench_app, name="bench")


_load_extensions()
