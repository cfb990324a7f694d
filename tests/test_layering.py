"""The science package stands alone: nothing in cancermoe/ imports Flower or MLflow (or the coordinator's and the
sites' packages), so a model can be trained and used without them. cmoe-predict reaches MLflow URIs only through
an optional import of the glue module `server.registry`, by name, at the moment a URI is given."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cancermoe

FORBIDDEN = ("flwr", "mlflow", "server", "client")


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_module_of_cancermoe_imports_flower_mlflow_or_the_federation_packages() -> None:
    package = Path(cancermoe.__file__).parent
    offending = {str(path.relative_to(package)): name for path in package.rglob("*.py")
                 for name in imported_names(path) if name.split(".")[0] in FORBIDDEN}
    assert offending == {}


def test_importing_every_cli_loads_neither_flower_nor_mlflow() -> None:
    code = ("import sys, cancermoe.cli.bank, cancermoe.cli.train, cancermoe.cli.predict, cancermoe.heatmaps, "
            "cancermoe.reports; print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
