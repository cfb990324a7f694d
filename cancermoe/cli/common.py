"""What every command-line entry point shares: one-line errors, exit code 2; the --list-config option."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from cancermoe.config import LIST_CONFIG_FLAG
from cancermoe.errors import InputError

EXIT_USER_ERROR = 2


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a Typer app; an `InputError` becomes ``error: <where>: <problem>`` and exit 2."""
    try:
        app(args=argv, standalone_mode=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def list_config_option(listing: Callable[[], list[str]]) -> typer.models.OptionInfo:
    """``--list-config``: print every config key with its default, type and meaning, one a line, and exit 0.
    Eager, so it works without the command's required arguments (as --help does)."""
    def show(requested: bool) -> None:
        if requested:
            typer.echo("\n".join(listing()))
            raise typer.Exit(0)

    return typer.Option(False, LIST_CONFIG_FLAG, is_eager=True, expose_value=False, callback=show,
                        help="List every config key (for --set and --config) with its default, then exit.")
