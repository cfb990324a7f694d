"""The benchmarks of bench/ still run: each script once at tiny sizes, checking it finishes and reports its ratios.

These are not timings (the numbers are meaningless at these sizes); they keep the scripts
from rotting as the code they measure changes. The full-size commands are in each script's docstring.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # each benchmark runs as its own Python process

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--tokens", "64", "--feature-dim", "32", "--threads", "1"]
NUMBER = r"\d+\.\d+"


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def test_model_memory_reports_step_time_and_peak_memory_ratios(workdir) -> None:
    out = run_bench("model_memory.py", *TINY, "--patches", "1000", "3000", "--batch", "2", "--steps", "1",
                    "--workdir", str(workdir))
    assert re.search(rf"ratio 3k/1k: step time {NUMBER}, peak RSS {NUMBER}", out), out
    assert re.search(rf"ratio 3k/1k: cold step time {NUMBER}, step growth {NUMBER}", out), out
    assert {path.name for path in workdir.glob("*.h5")} == {"patients2-slide1k-d32-g64.h5",
                                                              "patients2-slide3k-d32-g64.h5"}


def test_model_cost_compares_consolidated_sparse_and_dense_models() -> None:
    out = run_bench("model_cost.py", *TINY, "--genomic-features", "100")
    assert re.search(rf"ratio vs dense: \(a\) params {NUMBER}, GFLOPs {NUMBER}; \(b\) params {NUMBER}", out), out
    assert re.search(rf"ratio ours/paper: params {NUMBER}", out), out
    # Consolidation at ratio 0.5 halves the heads, so each layer's attention FLOPs must drop.
    ratios = [float(r) for r in re.findall(rf"attention of layer \d: .*\(ratio ({NUMBER}),", out)]
    assert len(ratios) == 2 and all(r < 1.0 for r in ratios), out


def test_vs_abmil_reports_ratios_and_rows_read(workdir) -> None:
    out = run_bench("vs_abmil.py", *TINY, "--patches", "2000", "--steps", "1", "--workdir", str(workdir))
    assert re.search(rf"ratio ABMIL/CancerMoE: step time {NUMBER}, peak RSS {NUMBER}, step growth {NUMBER}, "
                     rf"rows read {NUMBER}", out), out
    assert "ABMIL reads all 2000 rows, CancerMoE 64" in out, out  # the whole slide vs the N selected
