"""User-facing errors.

Everything a user can get wrong (a path, a file, a table, a flag) raises
`InputError`. The command-line entry points catch it and print one line,
``error: <where>: <problem>``, with exit code 2 and no traceback. Anything else
escaping is a bug in this project and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """Bad user input: names where (a file, usually) and what is wrong, in one line."""

    def __init__(self, where: str | PathLike[str], problem: str) -> None:
        self.where = str(where)
        self.problem = problem.replace("\n", " ")
        super().__init__(f"{self.where}: {self.problem}")
