"""A federation's model through the MLflow registry to a site's predictions, and a centralized run in MLflow.

The federation is the in-process one (the real strategy, Job, ClientApp and MLflow store; only the transport is
replaced, see tests/federation_helpers.py) with a SQLite tracking store, which the registry needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cancermoe.cohort import labelled_patients, open_cohort
from cancermoe.config import load_config
from cancermoe.train import load_checkpoint
from client.site import site_patients
from server.app import BEST, Job, JobSettings
from server.config import FederationConfig
from server.registry import (
    BEST_MODEL,
    DIGEST_TAG,
    LAST_MODEL,
    MODEL_NAME,
    file_digest,
    model_file_from_uri,
    publish_federated_models,
)
from tests.federation_helpers import SMALL_MODEL, grid_of_sites, synth_site
from tests.predict_helpers import copy_bank


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cancermoe.cli.predict", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    sites = {"A": synth_site(root / "A.h5", 1, patients=40, cancers=("BRCA", "LUAD")),
             "B": synth_site(root / "B.h5", 2, patients=40, cancers=("LUAD", "KIRC"))}
    model = load_config(overrides=[*SMALL_MODEL, "test_time_dps_passes=1"])
    federation = FederationConfig(rounds=2, min_sites=2, consolidate_round=1)
    uri = f"sqlite:///{root / 'server' / 'mlflow.db'}"
    job = Job(JobSettings(root / "server", uri, "test", False, model, federation))
    job.run(grid_of_sites(sites, root))
    return {"root": root, "sites": sites, "job": job, "uri": uri, "model": model, "federation": federation}


def test_the_job_logs_best_and_last_model_and_registers_the_best_with_its_card(federation) -> None:
    client = MlflowClient(federation["uri"])
    version = client.get_model_version(MODEL_NAME, "1")
    job = federation["job"]
    assert version.run_id == job.tracker.run_id
    card = version.description
    best_round = job.chosen_models()["best"]["round"]
    assert card.startswith(f"# CancerMoE, federated: round {best_round} of 2")
    for section in ("## Sites and patients", "## C-index on the held-out patients", "Protocol:", "## Data schema",
                    "## Config", "## Known limits", "## Risk groups"):
        assert section in card
    assert "| A |" in card and "| B |" in card and "| KIRC |" in card
    artifacts = {a.path for a in client.list_artifacts(job.tracker.run_id)}
    assert {BEST_MODEL, LAST_MODEL, "model_card.md"} <= artifacts
    assert client.get_run(job.tracker.run_id).data.tags["registered_model"] == f"models:/{MODEL_NAME}/1"
    # The thresholds of the risk groups came with the model file, from the pooled histogram (counts only).
    groups = load_checkpoint(job.workdir / BEST)["risk_groups"]
    assert set(groups["thresholds"]) == {"BRCA", "LUAD", "KIRC"} and "pooled risk histogram" in groups["source"]
    # mlflow.pyfunc loads it, and its predict takes patient rows.
    pyfunc = mlflow.pyfunc.load_model(client.get_model_version_download_uri(MODEL_NAME, "1"))
    rows = pyfunc.predict(pd.DataFrame({"bank": [str(federation["sites"]["A"])] * 2,
                                        "case_id": ["SYN-A-00000", "SYN-A-00001"]}))
    assert rows["case_id"].tolist() == ["SYN-A-00000", "SYN-A-00001"] and np.isfinite(rows["risk"]).all()


def test_cmoe_predict_a_registered_model_on_new_patients_and_on_held_out_ones(federation, tmp_path) -> None:
    bank_a = federation["sites"]["A"]
    new = copy_bank(bank_a, tmp_path / "new.h5", unlabelled=True)
    result = predict(f"models:/{MODEL_NAME}/1", str(new), "--out", str(tmp_path / "new"), "--tracking-uri",
                     federation["uri"], "--device", "cpu")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "new" / "predictions.csv")
    assert len(table) == 40 and table["case_id"].is_unique and not table["labelled"].any()
    assert set(table["risk_group"]) <= {"low", "intermediate", "high"}

    # Site A's held-out patients (the site's own seeded split): the c-index cmoe-predict prints is the one the
    # server logged for site A in the round the registered model comes from (pairs within the site and a cancer).
    model, fed, job = federation["model"], federation["federation"], federation["job"]
    held = site_patients(labelled_patients(open_cohort([bank_a]), "test"), fed.eval_fraction,
                         model.validation_fraction, model.seed).held
    held_bank = copy_bank(bank_a, tmp_path / "held.h5", case_ids=[r.patient.case_id for r in held.refs])
    result = predict(f"models:/{MODEL_NAME}/1", str(held_bank), "--out", str(tmp_path / "held"), "--tracking-uri",
                     federation["uri"], "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    best_round = job.chosen_models()["best"]["round"]
    logged = {m.step: m.value for m in MlflowClient(federation["uri"]).get_metric_history(job.tracker.run_id,
                                                                                          "cindex/site/A")}
    assert summary["cindex"]["all"]["cindex"] == pytest.approx(logged[best_round], abs=1e-12)
    assert summary["cindex"]["all"]["patients"] == len(held)


@pytest.mark.bad_input
def test_an_unknown_registered_model_is_one_line(federation, tmp_path) -> None:
    result = predict(f"models:/{MODEL_NAME}/7", str(federation["sites"]["A"]), "--out", str(tmp_path / "p"),
                     "--tracking-uri", federation["uri"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: models:/{MODEL_NAME}/7: not found in the model registry")


def test_cmoe_train_logs_to_the_same_experiment(federation, tmp_path) -> None:
    run = tmp_path / "central"
    result = subprocess.run([sys.executable, "-m", "cancermoe.cli.train", str(federation["sites"]["A"]), "--out",
                             str(run), "--epochs", "1", "--tokens", "32", "--set", "feature_dim=16", "--set",
                             "batch_size=8", "--tracking-uri", federation["uri"], "--experiment", "test"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(federation["uri"])
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id], "tags.`cmoe.kind` = 'centralized'")
    assert len(runs) == 1 and "cindex/all" in runs[0].data.metrics and "model.tokens" in runs[0].data.params
    assert "model" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    predicted = predict(f"runs:/{runs[0].info.run_id}/model", str(federation["sites"]["A"]), "--out",
                        str(tmp_path / "p"), "--tracking-uri", federation["uri"])
    assert predicted.returncode == 0, predicted.stderr


def test_a_new_best_model_of_the_same_run_is_registered_beside_the_first_which_keeps_its_files(federation) -> None:
    """A resumed job that found a better round registers it as a new version; the first version's files are not
    overwritten (its source is the run's `best_model`, the new one goes to `best_model_round_<r>`). Finishing
    again with the same model registers nothing."""
    job, client = federation["job"], MlflowClient(federation["uri"])
    best_file = job.workdir / BEST
    original = best_file.read_bytes()
    try:
        state = torch.load(best_file, weights_only=False)
        torch.save({**state, "note": "a later, better round"}, best_file)  # another model file, still loadable
        version = publish_federated_models(job, job.tracker.run_id)
        assert version == 2 and publish_federated_models(job, job.tracker.run_id) == 2  # once
        best_round = job.chosen_models()["best"]["round"]
        assert client.get_model_version(MODEL_NAME, "2").source.endswith(f"/{BEST_MODEL}_round_{best_round}")
        first = model_file_from_uri(f"models:/{MODEL_NAME}/1", federation["uri"], job.workdir / "v1")
        second = model_file_from_uri(f"models:/{MODEL_NAME}/2", federation["uri"], job.workdir / "v2")
        assert first.read_bytes() == original and second.read_bytes() == best_file.read_bytes()
        assert client.get_model_version(MODEL_NAME, "1").tags[DIGEST_TAG] == file_digest(first)
    finally:
        best_file.write_bytes(original)
