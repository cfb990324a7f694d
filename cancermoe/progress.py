"""Progress bars for long work (imports, synthesis, training), on stderr and only on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


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
