"""CLI commands of this area (registered by cli.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the ``dvprobe`` app."""
