"""What every command-line entry point shares: one-line errors, exit code 2."""

from __future__ import annotations

import sys

import typer

from cancermoe.errors import InputError

EXIT_USER_ERROR = 2


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a Typer app; an `InputError` becomes ``error: <where>: <problem>`` and exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
