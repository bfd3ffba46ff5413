"""`glora run` sub-command (placeholder: owned by its issue's implementer)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to ``app``."""
