"""The import arrows of DESIGN.md's layout, checked statically (ast) over every .py file of each package.

- ``cancermoe/`` (the science) imports no Flower and no MLflow, nor any of the federation packages;
- ``fedcommon/`` (what both ends speak) imports neither ``client/`` nor ``server/``, and no MLflow;
- ``client/`` never imports ``server/`` and ``server/`` never imports ``client/``;
- ``simulate/`` (cmoe-simulate, both ends at once) may import all of them; none of them imports it.

Every import counts, also one inside a function (a late import is still a dependency). A failure names the
file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# package -> top-level modules it must not import
FORBIDDEN = {
    "cancermoe": {"flwr", "mlflow", "client", "server", "fedcommon", "simulate"},
    "fedcommon": {"client", "server", "mlflow", "simulate"},
    "client": {"server", "simulate"},
    "server": {"client", "simulate"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``; a relative import is resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(REPO).parent.parts
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def violations(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    problems = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                problems.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_its_import_rules(package: str) -> None:
    assert (REPO / package / "__init__.py").exists(), f"{package}/ is not a package any more: update FORBIDDEN"
    problems = violations(package)
    assert not problems, (f"{package}/ must not import {', '.join(sorted(FORBIDDEN[package]))}:\n  "
                          + "\n  ".join(problems))


def test_the_checker_sees_late_and_relative_imports(tmp_path, monkeypatch) -> None:
    """The rule test would pass vacuously if the walker missed an import form: check it on planted files."""
    fake = tmp_path / "client"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "late.py").write_text("def f():\n    from server.app import app\n    return app\n")
    (fake / "relative.py").write_text("from ..server import strategy\n")
    (fake / "fine.py").write_text("import numpy\nfrom fedcommon.protocol import TrainReport\nfrom . import late\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert violations("client") == ["client/late.py:2 imports server.app", "client/relative.py:1 imports server"]
