"""What every command-line entry point shares: one-line errors, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

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


def progress_bar(total: int, description: str, enabled: bool = True) -> tuple[Callable[[int], Any], Callable[[], None]]:
    """A rich progress bar on stderr: returns (advance(n), close()). Silent when disabled or not a TTY."""
    if not enabled or not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    task = bar.add_task(description, total=total)
    return (lambda n: bar.advance(task, n)), bar.stop
