"""Progress bars for long work (imports, synthesis, training), on stderr and only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def progress_bar(total: int, description: str, enabled: bool = True,
                 ) -> tuple[Callable[..., Any], Callable[[], None]]:
    """A rich progress bar on stderr with ETA: returns (advance(n, description=None), close()).

    ``advance`` may also replace the description (the trainer shows the running loss there).
    Silent when disabled or when stderr is not a terminal (logs and CI stay clean).
    """
    if not enabled or not sys.stderr.isatty():
        return (lambda n, description=None: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    task = bar.add_task(description, total=total)

    def advance(n: int, description: str | None = None) -> None:
        bar.update(task, advance=n, **({"description": description} if description is not None else {}))

    return advance, bar.stop
