"""One definition of risk (higher = earlier death) on every path: a model trained on a world whose answer is
known must rank patients the right way round in `cmoe-train`'s evaluation, in a site's federated evaluation
(pair counts, histogram, risk groups) and when its model file is loaded for prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from cancermoe.acs import ConsolidationPlan
from cancermoe.cohort import open_cohort
from cancermoe.config import CancerMoEConfig, config_with
from cancermoe.experiment import load_model
from cancermoe.genomics import GenomicLayout, GenomicScaler
from cancermoe.survival import PairCounts
from cancermoe.synthetic import SynthSpec, synthesize_bank
from cancermoe.train import evaluate_risks, load_checkpoint
from client.site import SiteSettings, evaluate_round, split_site
from fedcommon.federated_eval import (
    RiskTimeGrid,
    cindex_from_histogram,
    compare_risk_groups,
    hazard_risk_edges,
    risk_groups_from_histogram,
    uniform_time_edges,
)

pytestmark = pytest.mark.process  # the module's model is trained by a cmoe-train subprocess


def synth(path: Path, seed: int, patients: int) -> Path:
    # A strong world (log-hazard SD 2), so that the model learns it in 15 epochs whatever the seed, and an evaluation
    # site large enough for a half of it to show the sign: these tests are about the sign of risk on every path,
    # which only a model that has learned something, scored on enough patients, can show.
    spec = SynthSpec(site=path.stem, patients=patients, cancers=("BRCA", "LUAD"), patches=100, seed=seed,
                     feature_dim=16, genomic_features=8, signal_fraction=0.2, risk_sd=2.0)
    return synthesize_bank(path, spec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """`cmoe-train` on site a of a synthetic world, evaluated on site b (the oracle c-index is ~0.82)."""
    root = tmp_path_factory.mktemp("sign")
    banks = {name: synth(root / f"{name}.h5", seed, patients) for name, seed, patients in (("a", 1, 300),
                                                                                           ("b", 2, 600))}
    done = subprocess.run([sys.executable, "-m", "cancermoe.cli.train", str(banks["a"]), "--eval", str(banks["b"]),
                           "--out", str(root / "run"), "--json", "--set", "feature_dim=16", "--set", "tokens=32",
                           "--set", "batch_size=8", "--set", "sparsify_keep=0.25", "--epochs", "15"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "banks": banks, "result": json.loads(done.stdout.strip().splitlines()[-1]),
            "model": root / "run" / "model.pt"}


def test_cmoe_train_ranks_the_unseen_site_the_right_way_round(trained) -> None:
    result = trained["result"]
    assert result["eval_cindex_interval"][0] > 0.5  # the whole 95% interval above chance
    assert result["train_cindex"] > 0.6


def test_a_loaded_model_file_predicts_higher_risk_for_higher_true_hazard(trained, tmp_path) -> None:
    cohort = open_cohort([trained["banks"]["b"]])
    risk = load_model(trained["model"], cohort, tmp_path).predict(cohort)
    oracle = np.array([ref.bank.oracle_risk[ref.patient.index] for ref in cohort.refs])
    assert stats.spearmanr(risk, oracle).statistic > 0.3
    assert evaluate_risks(cohort, risk).counts.interval()[0] > 0.5


def test_a_sites_federated_evaluation_has_the_same_sign(trained, tmp_path) -> None:
    state = load_checkpoint(trained["model"])
    config = config_with(CancerMoEConfig(), state["config"], "model")
    plan = ConsolidationPlan.from_dict(state["plan"]) if state["plan"] else None
    grid = RiskTimeGrid(hazard_risk_edges(config.n_bins, 64), uniform_time_edges(240.0, 2.0))
    site = SiteSettings(site="b", bank=trained["banks"]["b"], workdir=tmp_path / "site-b", device="cpu")
    report = evaluate_round(site, config, edges=np.asarray(state["edges"]), plan=plan, weights=state["model"],
                            grid=grid, eval_fraction=0.5, scaler=GenomicScaler.from_dict(state["genomic_scaler"]),
                            layout=GenomicLayout.from_dict(state["genomic_layout"]))
    _, held = split_site(open_cohort([site.bank]), 0.5, config.seed)
    central = load_model(trained["model"], held, tmp_path / "central").evaluate(held)
    histogram = sum(part.histogram for part in report.cancers.values())
    for cancer, part in report.cancers.items():
        assert part.pairs == central.per_cancer[cancer]  # the site's risk is the model file's risk
    pairs = sum((part.pairs for part in report.cancers.values()), PairCounts())
    assert pairs.interval()[0] > 0.5 and cindex_from_histogram(histogram).interval()[0] > 0.5
    groups = compare_risk_groups(risk_groups_from_histogram(histogram, grid))
    assert groups.high_survival[-1] < groups.low_survival[-1] and groups.p_value < 0.05
