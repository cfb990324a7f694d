"""bench/federation.py still runs: the quality section once at tiny sizes (1 round, 1 local epoch, tiny sites).

Not a measurement (one epoch on a few dozen patients means nothing); the full-size
command is in the script's docstring. The cost section needs real SuperLink and
SuperNode processes: that path is covered by tests/test_federation_e2e.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # each benchmark runs as its own Python process

BENCH = Path(__file__).resolve().parents[1] / "bench" / "federation.py"
TINY = ["--rounds", "1", "--local-epochs", "1", "--patients", "24", "--test-patients", "30", "--patches", "40",
        "--tokens", "16", "--feature-dim", "16", "--genomic-features", "8", "--threads", "1"]
INTERVAL = r"(?:\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]|n/a)"  # bench/report.cindex_with_interval
HEADER = "| method | BRCA | KIRC | LUAD | mean of cancers | stratified | training patients | train seconds |"
CINDEX = r"(\d\.\d{3}|n/a)"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=180)


def test_quality_section_prints_one_row_per_method(tmp_path) -> None:
    done = run_bench("--sections", "quality", "--workdir", str(tmp_path), *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert HEADER in out
    patients = {}
    for label in ("federated, load-aware", "federated, FedAvg", "centralized, pooled A+B+C",
                  "site A alone (BRCA/LUAD)", "site B alone (LUAD/KIRC)", "site C alone (BRCA/KIRC)"):
        row = re.search(rf"^\| {re.escape(label)} \| {CINDEX} \| {CINDEX} \| {CINDEX} \| {CINDEX} \| {INTERVAL} "
                        r"\| (\d+) \| \d+ \|$", out, re.MULTILINE)
        assert row, (label, out)
        patients[label] = int(row.group(5))
    oracle = (rf"^\| oracle \(true log-hazard\) \| {CINDEX} \| {CINDEX} \| {CINDEX} "
              rf"\| \d\.\d{{3}} \| {INTERVAL} \|  \|  \|$")
    assert re.search(oracle, out, re.MULTILINE), out
    # Every row trains on the same patients: the federated sites' training splits, pooled or one at a time.
    assert patients["federated, load-aware"] == patients["federated, FedAvg"] == patients["centralized, pooled A+B+C"]
    assert sum(patients[f"site {s} alone ({c})"] for s, c in (("A", "BRCA/LUAD"), ("B", "LUAD/KIRC"),
                                                               ("C", "BRCA/KIRC"))) == patients["federated, FedAvg"]
    assert re.search(r"^\| quality \| \d+\.\d \|$", out, re.MULTILINE), out
    assert "Cost of a federated round" not in out  # only the section asked for ran


def test_tcga_sites_section_checks_the_federated_counts_against_central_scoring(tmp_path) -> None:
    done = run_bench("--sections", "tcga-sites", "--workdir", str(tmp_path), "--tcga-rounds", "2",
                     "--tcga-seeds", "0", "--tcga-min-patients", "150", "--set", "validation_fraction=0.2")
    assert done.returncode == 0, done.stderr[-3000:]
    for round_number in (1, 2):
        assert re.search(rf"^\| 0 \| {round_number} \| {INTERVAL} \| {INTERVAL} \| \d+ \| {CINDEX} \|$",
                         done.stdout, re.MULTILINE), done.stdout
    # ... and the mean of the sites' own models, each trained alone
    assert re.search(rf"^\| 0 \| {INTERVAL} \| {INTERVAL} \| {INTERVAL} \| {INTERVAL} \| yes \| {CINDEX} \|$",
                     done.stdout, re.MULTILINE), done.stdout
    # With a validation share: the round the sites' validation patients chose, against the centralized best epoch
    assert re.search(rf"^\| 0 \| {CINDEX} \| [12] \| {CINDEX} \| [+-]\d\.\d{{3}} \|$", done.stdout, re.MULTILINE), \
        done.stdout


TINY_RANKING = ["--rank-seeds", "0,1", "--rank-sites", "3", "--rank-mean-patients", "24", "--rank-min-patients", "20",
                "--rank-patches", "30", "--rank-rounds", "1", "--rank-local-epochs", "1", "--rank-tokens", "16",
                "--rank-genomic-features", "8", "--threads", "1"]
RANK_LABELS = ("federated, load-aware", "federated, FedAvg", "federated, FedProx", "federated, load-aware-cls",
               "federated, FedAvg, server lr", "federated, FedAvgM", "federated, FedAdam",
               "federated, FedAdam, sites on SGD", "centralized, pooled",
               "each site alone, mean over sites", "oracle (true log-hazard)")


def test_ranking_section_ranks_every_method_over_seeds_and_resumes_from_its_cache(tmp_path) -> None:
    done = run_bench("--sections", "ranking", "--workdir", str(tmp_path), *TINY_RANKING)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| row | seed 0 | seed 1 | mean +- sd | 95% t-interval |" in out
    summary = rf"{CINDEX} \| {CINDEX} \| -?\d\.\d{{3}} \+- \d\.\d{{3}} \| \[-?\d\.\d{{3}}, -?\d\.\d{{3}}\]"
    for label in RANK_LABELS:
        assert re.search(rf"^\| {re.escape(label)} \| {summary} \|$", out, re.MULTILINE), (label, out)
    differences = r"-?\d\.\d{3} \| -?\d\.\d{3} \| -?\d\.\d{3} \+- \d\.\d{3} \| \[-?\d\.\d{3}, -?\d\.\d{3}\]"
    for pair in ("federated, load-aware - federated, FedAvg", "federated, FedProx - federated, FedAvg",
                 "centralized, pooled - federated, FedAvg", "each site alone, mean over sites - federated, FedAvg",
                 "federated, load-aware - centralized, pooled", "federated, FedAvg - centralized, pooled",
                 "federated, FedProx - centralized, pooled", "federated, load-aware-cls - federated, FedAvg",
                 "federated, load-aware-cls - centralized, pooled",
                 "federated, load-aware-cls - federated, load-aware",
                 "federated, FedAvg, server lr - federated, FedAvg", "federated, FedAvgM - federated, FedAvg",
                 "federated, FedAvgM - centralized, pooled", "federated, FedAdam - federated, FedAvg",
                 "federated, FedAdam - centralized, pooled", "federated, FedAdam, sites on SGD - federated, FedAvg"):
        assert re.search(rf"^\| {re.escape(pair)} \(paired\) \| {differences} \|$", out, re.MULTILINE), (pair, out)
    assert "Goal load-aware - FedAvg >= 0 over 2 seeds: " in out
    assert "Goal federated - pooled >= -0.01 (load-aware): " in out
    cached = sorted(p.name for p in tmp_path.glob("ranking/*/seed-*.json"))
    assert len(cached) == 2 * len(RANK_LABELS), cached
    # A second run trains nothing: every (seed, method) comes from its JSON, and the table is the same.
    again = run_bench("--sections", "ranking", "--workdir", str(tmp_path), *TINY_RANKING)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ranking: seed" not in again.stderr
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")][:len(table) - 2] == table[:-2]
    # A subset of the methods: their rows, and the paired rows of the pairs present, only.
    subset = run_bench("--sections", "ranking", "--workdir", str(tmp_path), *TINY_RANKING,
                       "--rank-methods", "load-aware,fedavg")
    assert subset.returncode == 0, subset.stderr[-3000:]
    rows = [line.split(" | ")[0][2:] for line in subset.stdout.splitlines() if line.startswith("| ")]
    assert rows[:4] == ["row", "federated, load-aware", "federated, FedAvg",
                        "federated, load-aware - federated, FedAvg (paired)"], rows
    # --fed-set: the federated rows' own config (here their sites' learning rate) is another setting, cached apart.
    sites_lr = run_bench("--sections", "ranking", "--workdir", str(tmp_path), *TINY_RANKING,
                         "--rank-methods", "fedavg", "--fed-set", "lr=0.002")
    assert sites_lr.returncode == 0, sites_lr.stderr[-3000:]
    assert "learning rate 0.001 (federated methods' sites: 0.002)" in sites_lr.stdout
    assert len(list(tmp_path.glob("ranking/*/seed-*-fedavg.json"))) == 4


@pytest.mark.bad_input
def test_an_unknown_section_is_refused(tmp_path) -> None:
    done = run_bench("--sections", "quality,speed", "--workdir", str(tmp_path))
    assert done.returncode == 2
    assert "sections are a comma-separated subset of quality,cost" in done.stderr
