"""Regularization chosen by inner cross-validation (`cancermoe.tuning`, `cancermoe.experiment.fit_tuned`): the grid,
the choice, and proof that no evaluation patient reaches the choice."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cancermoe.experiment as experiment
from cancermoe.cohort import open_cohort
from cancermoe.config import CancerMoEConfig, load_config, parse_grid
from cancermoe.errors import InputError
from cancermoe.predict import load_model_state
from cancermoe.survival import PairCounts
from cancermoe.synthetic import SynthSpec, synthesize_bank
from cancermoe.tuning import CandidateScore, best_candidate, grid_candidates

SMALL = ["feature_dim=16", "tokens=32", "batch_size=8", "sparsify_keep=0.25", "epochs=2",
         "consolidate_after_epoch=1"]


# --------------------------------------------------------------------------- pure pieces


def test_a_grid_is_typed_by_its_keys_and_tried_in_every_combination():
    grid = parse_grid("dropout=0.1,0.3; weight-decay=1e-5,1e-3 ;balanced_sampling=true")
    assert grid == {"dropout": [0.1, 0.3], "weight_decay": [1e-5, 1e-3], "balanced_sampling": [True]}
    candidates = grid_candidates(grid)
    assert len(candidates) == 4
    assert candidates[0] == {"dropout": 0.1, "weight_decay": 1e-5, "balanced_sampling": True}
    assert candidates[1] == {"dropout": 0.1, "weight_decay": 1e-3, "balanced_sampling": True}  # last key fastest
    assert parse_grid("") == {} and grid_candidates({}) == [{}]


@pytest.mark.parametrize(("grid", "problem"), [
    ("dropot=0.1,0.3", "did you mean 'dropout'"),
    ("seed=1,2", "seed cannot be tuned"),
    ("ensemble_size=1,5", "ensemble_size cannot be tuned"),
    ("dropout=0.1,high", "expected float"),
    ("dropout", "not key=value"),
    ("dropout=0.1;dropout=0.3", "dropout given twice"),
    ("dropout=0.1,1.5", "dropout 1.5 must be in"),
])
def test_a_bad_grid_is_refused_naming_the_problem(grid, problem):
    with pytest.raises(InputError, match=problem):
        load_config(overrides=[f"inner_cv_grid={grid}"])


def test_inner_cv_needs_two_folds():
    with pytest.raises(ValueError, match="inner_cv_folds must be at least 2"):
        CancerMoEConfig(inner_cv_folds=1)


def test_the_best_pooled_inner_cindex_wins_the_first_on_ties_and_nan_last():
    def score(value: float, concordant: int, discordant: int) -> CandidateScore:
        return CandidateScore({"dropout": value}, PairCounts(concordant=concordant, discordant=discordant))

    assert best_candidate([score(0.1, 6, 4), score(0.3, 7, 3)]).changes == {"dropout": 0.3}
    assert best_candidate([score(0.1, 7, 3), score(0.3, 14, 6)]).changes == {"dropout": 0.1}
    assert best_candidate([score(0.1, 0, 0), score(0.3, 4, 6)]).changes == {"dropout": 0.3}
    assert math.isnan(score(0.1, 0, 0).cindex)
    with pytest.raises(ValueError):
        best_candidate([])


def test_a_federation_refuses_inner_cross_validation():
    from server.config import resolve_configs

    with pytest.raises(InputError, match="inner cross-validation is cmoe-train's"):
        resolve_configs(None, ["inner_cv_grid=dropout=0.1,0.3"], {})


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    spec = SynthSpec(site="T", patients=72, cancers=("BRCA", "LUAD"), patches=40, seed=8, feature_dim=16,
                     genomic_features=8, signal_fraction=0.2)
    return synthesize_bank(tmp_path_factory.mktemp("tuning") / "T.h5", spec)


def keys(cohort) -> set[str]:
    return {ref.key for ref in cohort.refs}


@pytest.mark.slow
def test_no_evaluation_patient_reaches_the_choice_and_the_best_candidate_is_trained(bank, tmp_path, monkeypatch):
    cohort = open_cohort([bank])
    train, held = cohort.subset(range(54)), cohort.subset(range(54, len(cohort)))
    fits = []  # (config, training case ids, evaluation case ids) of every model trained
    real_fit_model = experiment.fit_model

    def recording_fit_model(config, fit_on, evaluate_on, out_dir, **kwargs):
        fits.append((config, keys(fit_on), keys(evaluate_on) if evaluate_on is not None else set()))
        return real_fit_model(config, fit_on, evaluate_on, out_dir, **kwargs)

    monkeypatch.setattr(experiment, "fit_model", recording_fit_model)
    config = load_config(overrides=[*SMALL, "inner_cv_grid=dropout=0.0,0.5", "inner_cv_folds=2"])
    result = experiment.fit(config, train, held, tmp_path, device=torch.device("cpu"))

    inner, final = fits[:-1], fits[-1]
    assert len(inner) == 2 * 2  # candidates x inner folds
    held_ids, train_ids = keys(held), keys(train)
    for _, fit_on, scored_on in inner:
        assert not (fit_on | scored_on) & held_ids  # the evaluation patients take no part in the choice
        assert not fit_on & scored_on and fit_on | scored_on == train_ids
    # Each candidate's score is the sum of its inner folds' held-out pair counts, and the best one won.
    assert [s.changes for s in result.inner_cv] == [{"dropout": 0.0}, {"dropout": 0.5}]
    assert result.tuned == best_candidate(result.inner_cv).changes
    assert final[0].dropout == result.tuned["dropout"] and final[0].inner_cv_grid == ""
    assert final[1] == train_ids and final[2] == held_ids
    saved = load_model_state(tmp_path / "model.pt")
    assert saved["config"]["dropout"] == result.tuned["dropout"] and saved["config"]["inner_cv_grid"] == ""
    counts = json.loads((tmp_path / "inner-cv" / "candidate-1" / "fold-0" / "inner-counts.json").read_text())
    assert counts["changes"] == {"dropout": 0.5}

    # A resumed run reuses the finished inner fits: only the final model is trained again.
    fits.clear()
    resumed = experiment.fit(config, train, held, tmp_path, device=torch.device("cpu"), resume=True)
    assert len(fits) == 1 and resumed.tuned == result.tuned
    assert [s.counts for s in resumed.inner_cv] == [s.counts for s in result.inner_cv]


@pytest.mark.process
def test_cmoe_train_reports_the_inner_cross_validation_in_its_json(bank, tmp_path):
    trained = subprocess.run(
        [sys.executable, "-m", "cancermoe.cli.train", str(bank), "--out", str(tmp_path / "run"), "--folds", "2",
         *[f"--set={item}" for item in SMALL], "--set", "inner_cv_grid=dropout=0.0,0.5", "--set",
         "inner_cv_folds=2", "--json"], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert "2-fold inner cross-validation" in summary["protocol"]
    for fold in summary["folds"]:
        assert fold["inner_cv"]["chosen"]["dropout"] in (0.0, 0.5)
        assert len(fold["inner_cv"]["candidates"]) == 2
