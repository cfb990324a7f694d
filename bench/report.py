"""Markdown tables that the benchmark scripts print (ready to paste into the README)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from cancermoe.errors import InputError
from cancermoe.survival import PairCounts


def exit_on_input_error(run: Callable[[], None]) -> None:
    """Run a benchmark; a user error is one line on stderr (``error: <where>: <problem>``) and exit code 2."""
    try:
        run()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [f"**{self.title}** ({self.seconds / 60:.1f} min)", "",
                 "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + self.notes
        return "\n".join(lines)


def cindex_with_interval(counts: PairCounts) -> str:
    """``0.612 [0.541, 0.683]``: the c-index and its 95% interval (`PairCounts.interval`); n/a where undefined."""
    lower, upper = counts.interval()
    if counts.comparable == 0:
        return "n/a"
    return f"{counts.cindex:.3f} [{lower:.3f}, {upper:.3f}]"
