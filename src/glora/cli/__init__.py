"""The ``glora`` command line (typer + rich). Each sub-command lives in its own module."""

from __future__ import annotations

import typer

from glora.cli import aggregate, bench, compare, flower, run

app = typer.Typer(
    name="glora",
    help="Federated LoRA fine-tuning with gauge-aware aggregation (GLoRA) and its baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
run.register(app)
aggregate.register(app)
bench.register(app)
compare.register(app)
flower.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
