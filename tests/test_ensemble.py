"""Seed ensembles (`cancermoe.ensemble`): how members combine, and `cmoe-train`'s ensemble end to end (members
trained, one model file, loaded and predicted as one model is); federations refuse them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cancermoe.cohort import Cohort, open_cohort
from cancermoe.config import load_config
from cancermoe.ensemble import (
    EnsemblePredictor,
    ensemble_state,
    hazard_logits_of_survival,
    is_ensemble,
    survival_of_hazard_logits,
)
from cancermoe.errors import InputError
from cancermoe.experiment import fit, load_model, selection_protocol
from cancermoe.predict import load_model_state, predict_cohort, survival_per_bin
from cancermoe.survival import risk_from_hazard_logits
from cancermoe.synthetic import SynthSpec, synthesize_bank
from cancermoe.train import PredictionDetails, evaluate_risks, load_checkpoint

SMALL = ["feature_dim=16", "tokens=32", "batch_size=8", "sparsify_keep=0.25", "epochs=3",
         "consolidate_after_epoch=1"]


# --------------------------------------------------------------------------- pure pieces


def test_hazard_logits_of_a_survival_curve_give_that_curve_back():
    rng = np.random.default_rng(0)
    survival = np.cumprod(rng.uniform(0.5, 0.99, size=(6, 4)), axis=1)
    logits = hazard_logits_of_survival(survival)
    assert np.allclose(survival_of_hazard_logits(logits), survival, atol=1e-9)
    assert np.allclose(survival_per_bin(logits), survival, atol=1e-9)  # what cmoe-predict writes


class FixedMember:
    """A stand-in member that predicts fixed hazard logits (pure combination logic only)."""

    def __init__(self, logits: np.ndarray) -> None:
        self.details = PredictionDetails(risk_from_hazard_logits(logits), logits)

    def predict_details(self, cohort, *, patches: bool = False) -> PredictionDetails:
        return self.details


def test_the_ensemble_is_the_mixture_of_its_members():
    logits_a, logits_b = np.zeros((2, 3)), np.array([[-2.0, -2.0, -2.0], [1.0, 1.0, 1.0]])
    ensemble = EnsemblePredictor([FixedMember(logits_a), FixedMember(logits_b)])
    details = ensemble.predict_details(None)
    curve = (survival_of_hazard_logits(logits_a) + survival_of_hazard_logits(logits_b)) / 2
    assert np.allclose(survival_of_hazard_logits(details.hazard_logits), curve)
    # The risk is that of the mean curve, as for one model (-sum of S), hence also the mean of the members' risks.
    assert np.allclose(details.risk, -curve.sum(axis=1))
    assert np.allclose(details.risk, (risk_from_hazard_logits(logits_a) + risk_from_hazard_logits(logits_b)) / 2)
    assert details.risk[0] < details.risk[1]


def test_members_with_different_time_bins_do_not_make_an_ensemble():
    member = {"config": {}, "edges": [0.0, 5.0, 1e9], "plan": None, "model": {}}
    with pytest.raises(ValueError, match="share their time bins"):
        ensemble_state({}, [member, {**member, "edges": [0.0, 7.0, 1e9]}])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    spec = SynthSpec(site="E", patients=80, cancers=("BRCA", "LUAD"), patches=40, seed=6, feature_dim=16,
                     genomic_features=8, signal_fraction=0.2)
    return synthesize_bank(tmp_path_factory.mktemp("ensemble") / "E.h5", spec)


def train_and_held(bank: Path) -> tuple[Cohort, Cohort]:
    """The bank's first 60 patients to train on, the rest held out."""
    cohort = open_cohort([bank])
    return cohort.subset(range(60)), cohort.subset(range(60, len(cohort)))


@pytest.mark.slow
def test_an_ensemble_trains_its_members_and_predicts_as_their_mixture(bank, tmp_path):
    train, held = train_and_held(bank)
    config = load_config(overrides=[*SMALL, "ensemble_size=2", "seed=5"])
    result = fit(config, train, held, tmp_path, device=torch.device("cpu"))

    assert [m.model_state["config"]["seed"] for m in result.members] == [5, 6]
    assert all(m.model_state["config"]["ensemble_size"] == 1 for m in result.members)  # each member: one model
    assert len(result.epochs) == 2 * config.epochs
    state = load_model_state(tmp_path / "model.pt")
    assert is_ensemble(state) and len(state["members"]) == 2 and "risk_groups" in state
    # Each member is also a model of its own, which scored the held-out patients as one model would; the
    # ensemble's risk is the mean of theirs.
    alone = [load_model(tmp_path / f"member-{k}" / "model.pt", held, tmp_path / f"alone-{k}") for k in range(2)]
    for member, fitted in zip(alone, result.members, strict=True):
        assert member.evaluate(held).counts == fitted.evaluation.counts
    mean_risk = np.mean([member.predict(held) for member in alone], axis=0)
    ensemble = load_model(tmp_path / "model.pt", held, tmp_path / "loaded")
    assert np.allclose(ensemble.predict(held), mean_risk)
    assert ensemble.evaluate(held).counts == result.evaluation.counts
    assert evaluate_risks(held, mean_risk).counts == result.evaluation.counts
    # cmoe-predict's path: risk, and survival per time bin that falls with time.
    prediction = predict_cohort(state, held)
    assert np.allclose(prediction.risk, ensemble.predict(held))
    assert np.allclose(-prediction.survival.sum(axis=1), prediction.risk)  # as cmoe-predict's CSV promises
    assert prediction.survival.shape == (len(held), config.n_bins)
    assert np.all(np.diff(prediction.survival, axis=1) <= 1e-12)
    assert len(set(prediction.groups)) > 1
    assert "ensemble of 2 models" in selection_protocol(config)


@pytest.mark.slow
def test_ensemble_members_share_the_validation_split_of_the_configs_seed(bank, tmp_path):
    cohort = open_cohort([bank])
    config = load_config(overrides=[*SMALL, "epochs=2", "ensemble_size=2", "validation_fraction=0.25"])
    result = fit(config, cohort, None, tmp_path, device=torch.device("cpu"))
    edges = [load_checkpoint(tmp_path / f"member-{k}" / "model.pt")["edges"] for k in range(2)]
    assert edges[0] == edges[1] == load_model_state(tmp_path / "model.pt")["edges"]
    assert [len(m.train_evaluation.risk) for m in result.members] == [len(result.train_evaluation.risk)] * 2


def test_a_federation_refuses_an_ensemble():
    from server.config import resolve_configs

    with pytest.raises(InputError, match="ensemble_size=3: ensembles are cmoe-train's"):
        resolve_configs(None, ["ensemble_size=3"], {})
    model, _ = resolve_configs(None, ["ensemble_size=1"], {})
    assert model.ensemble_size == 1


@pytest.mark.process
def test_cmoe_train_trains_an_ensemble_that_cmoe_predict_uses(bank, tmp_path):
    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)

    trained = run("cancermoe.cli.train", str(bank), "--out", str(tmp_path / "run"), "--epochs", "2",
                  *[f"--set={item}" for item in SMALL if not item.startswith("epochs")], "--set", "ensemble_size=2",
                  "--json")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["protocol"].startswith("held-out") and "an ensemble of 2 models" in summary["protocol"]
    assert (tmp_path / "run" / "member-1" / "model.pt").exists()
    predicted = run("cancermoe.cli.predict", str(tmp_path / "run"), str(bank), "--out", str(tmp_path / "p"),
                    "--device", "cpu", "--heatmaps")
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(table) == len(open_cohort([bank]))
    survival = table.filter(like="survival_").drop(columns="survival_months").to_numpy()
    np.testing.assert_allclose(-survival.sum(axis=1), table["risk"], rtol=1e-5)
    assert list((tmp_path / "p" / "heatmaps").glob("*.geojson"))  # the first member's patch scores


@pytest.mark.slow
def test_a_resumed_ensemble_ends_with_the_same_model(bank, tmp_path):
    train, held = train_and_held(bank)
    config = load_config(overrides=[*SMALL, "epochs=2", "ensemble_size=2"])
    first = fit(config, train, held, tmp_path, device=torch.device("cpu"))
    # Interrupted after member 0: member 1 and the ensemble's file were never written.
    shutil.rmtree(tmp_path / "member-1")
    (tmp_path / "model.pt").unlink()
    resumed = fit(config, train, held, tmp_path, device=torch.device("cpu"), resume=True)
    assert resumed.evaluation.counts == first.evaluation.counts
    assert [len(m.epochs) for m in resumed.members] == [0, 2]  # member 0 from its checkpoint, member 1 trained
    assert is_ensemble(load_model_state(tmp_path / "model.pt"))
