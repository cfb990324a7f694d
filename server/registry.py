"""MLflow models, the model registry and model cards: glue between our model files and MLflow (thin).

A trained model is logged as an MLflow ``python_function`` model whose one artifact is our model file
(``model.pt`` / ``best.pt``, unchanged): `mlflow.pyfunc.load_model` gives a model whose ``predict`` takes a
DataFrame of patient rows (``bank``: a bank path at the machine that predicts, ``case_id``: optional, all the
bank's patients when absent) and returns `cancermoe.reports.prediction_table` rows; `cmoe-predict
models:/cancermoe/3` resolves the URI back to the model file (`model_file_from_uri`) and runs as on a file.

The federated server logs the best and the last global model in the job run (``best_model``, ``last_model``)
and registers the best as `MODEL_NAME`, its model card (markdown: config, rounds, sites, patients and cancers per
site, per-cancer c-index with the protocol that produced it, data schema, known limits) logged inside the model
and set as the model version's description. `cmoe-train --tracking-uri` logs a centralized run to the same kind
of experiment (`log_centralized_run`), so both compare side by side.

Registering needs a database-backed store (``sqlite:///...`` or a tracking server with one).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from sqlalchemy.exc import SQLAlchemyError

from cancermoe import __version__
from cancermoe.bank import SCHEMA_VERSION
from cancermoe.cohort import open_cohort
from cancermoe.errors import InputError
from cancermoe.predict import bin_labels, load_model_state, predict_cohort
from cancermoe.reports import prediction_table
from server.tracking import flatten_params, training_experiment

if TYPE_CHECKING:
    from server.app import Job

MODEL_NAME = "cancermoe"
BEST_MODEL = "best_model"  # artifact paths of the two models in the job run
LAST_MODEL = "last_model"
CHECKPOINT_KEY = "checkpoint"  # the pyfunc artifact holding our model file
MODEL_CARD = "model_card.md"
DIGEST_TAG = "cmoe.model_sha256"  # on a registered version: the SHA-256 of the model file it holds
PUBLISH_ERRORS = (MlflowException, requests.RequestException, OSError, SQLAlchemyError)
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


# --------------------------------------------------------------------------- the pyfunc model


class CancerMoEModel(mlflow.pyfunc.PythonModel):
    """A CancerMoE model file as an MLflow pyfunc model: patient rows in, predictions out."""

    def load_context(self, context: Any) -> None:
        self.state = load_model_state(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        banks = list(dict.fromkeys(str(b) for b in frame["bank"]))
        cohort = open_cohort(banks)
        if "case_id" not in frame or frame["case_id"].isna().all():
            return prediction_table(predict_cohort(self.state, cohort))
        position = {(str(Path(r.bank.path)), r.patient.case_id): i for i, r in enumerate(cohort.refs)}
        rows = []
        for bank, case_id in zip(frame["bank"], frame["case_id"], strict=True):
            key = (str(Path(str(bank))), str(case_id))
            if key not in position:
                raise InputError(bank, f"no patient {case_id}")
            rows.append(position[key])
        return prediction_table(predict_cohort(self.state, cohort.subset(rows)))


def signature(state: dict[str, Any]) -> ModelSignature:
    inputs = Schema([ColSpec("string", "bank"), ColSpec("string", "case_id", required=False)])
    outputs = Schema([ColSpec("string", "bank"), ColSpec("string", "case_id"), ColSpec("string", "cancer"),
                      ColSpec("string", "subtype"), ColSpec("boolean", "labelled"),
                      ColSpec("double", "survival_months", required=False),
                      ColSpec("long", "censorship", required=False), ColSpec("double", "risk"),
                      ColSpec("string", "risk_group"),
                      *[ColSpec("double", name) for name in bin_labels(state["edges"])]])
    return ModelSignature(inputs=inputs, outputs=outputs)


def save_model(model_file: Path, folder: Path, card: str | None = None) -> Path:
    """An MLflow pyfunc model in ``folder`` around ``model_file`` (copied in as is), with the model card."""
    state = load_model_state(model_file)
    example = pd.DataFrame({"bank": ["/data/site.h5"], "case_id": ["TCGA-XX-0001"]})
    mlflow.pyfunc.save_model(str(folder), python_model=CancerMoEModel(), artifacts={CHECKPOINT_KEY: str(model_file)},
                             signature=signature(state), input_example=example,
                             pip_requirements=[f"cancermoe-fl=={__version__}"])
    if card is not None:
        (folder / MODEL_CARD).write_text(card)
    return folder


def log_model(client: MlflowClient, run_id: str, model_file: Path, artifact_path: str,
              card: str | None = None) -> str:
    """``model_file`` as a pyfunc model at ``artifact_path`` in the run; returns its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory(prefix="cmoe-mlflow-") as scratch:
        folder = save_model(model_file, Path(scratch) / "model", card)
        client.log_artifacts(run_id, str(folder), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def register(client: MlflowClient, run_id: str, artifact_path: str, description: str,
             name: str = MODEL_NAME, tags: dict[str, str] | None = None) -> int:
    """A new version of the registered model ``name`` from the run's model; returns the version number."""
    try:
        client.create_registered_model(name, description="CancerMoE survival models (see each version's card)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, description=description, tags=tags)
    return int(version.version)


def file_digest(path: Path) -> str:
    """SHA-256 of a model file: which model a registered version holds."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions_of_run(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> list[Any]:
    """The versions of ``name`` registered from run ``run_id`` (none when ``name`` is not registered yet)."""
    try:
        return list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return []


# --------------------------------------------------------------------------- the federation's models


def publish_federated_models(job: Job, run_id: str) -> int:
    """Log ``model.pt`` (``last_model``) and ``best.pt`` (``best_model``) in the job run and register the best
    (the last when no round became best) with its model card; returns the registered version.

    Once per model: a finished job resumed (``cmoe-server --resume`` runs `Job.finish` again) or a finish that
    is repeated after a crash finds the version this run registered with the same model file (`DIGEST_TAG`) and
    returns it, registering and uploading nothing. A resumed job that ran more rounds and found a new best model
    registers that one as a new version, logged beside the earlier version's files (``best_model_round_<r>``)
    so that version keeps the model it was registered with."""
    from server.app import BEST, FINAL

    client = MlflowClient(job.settings.tracking_uri)
    chosen = job.chosen_models()
    best_file = job.workdir / BEST
    best = chosen["best"] if best_file.exists() and chosen["best"] else None
    digest = file_digest(best_file if best is not None else job.workdir / FINAL)
    earlier = versions_of_run(client, run_id)
    if same := sorted(int(v.version) for v in earlier if (v.tags or {}).get(DIGEST_TAG) == digest):
        return same[0]
    # An earlier version's files stay as registered: a model of this run goes beside them, not over them.
    taken = {str(v.source).rstrip("/").rsplit("/", 1)[-1] for v in earlier}

    def artifact_path(name: str, chosen_model: dict[str, Any] | None) -> str:
        return name if name not in taken else f"{name}_round_{chosen_model['round'] if chosen_model else 0}"

    last_card = federated_model_card(job, chosen["last"], job.workdir / FINAL)
    registered, card = artifact_path(LAST_MODEL, chosen["last"]), last_card
    log_model(client, run_id, job.workdir / FINAL, registered, last_card)
    if best is not None:
        card = federated_model_card(job, best, best_file)
        registered = artifact_path(BEST_MODEL, best)
        log_model(client, run_id, best_file, registered, card)
    client.log_text(run_id, card, MODEL_CARD)
    version = register(client, run_id, registered, card, tags={DIGEST_TAG: digest})
    client.set_tag(run_id, "registered_model", f"models:/{MODEL_NAME}/{version}")
    return version


def federated_model_card(job: Job, chosen: dict[str, Any] | None, model_file: Path) -> str:
    """The model card of one of the job's models (``chosen``: `Job.chosen_models`'s entry for it)."""
    state = load_model_state(model_file)
    round_number = chosen["round"] if chosen else 0
    metrics = next((row["metrics"] for row in job.history if row["round"] == round_number), {})
    sites = sorted({s for row in job.history for s in row["sites_trained"]})
    cancers = sorted({k.split("/", 1)[1] for k in metrics if k.startswith("cindex/") and "/site/" not in k} - {"all"})
    lines = [f"# CancerMoE, federated: round {round_number} of {job.settings.federation.rounds}", "",
             f"How this model was chosen: {chosen['chosen'] if chosen else 'the last round'}.", "",
             "## Sites and patients", "",
             "| site | patients trained on (last round) | held-out patients per cancer |", "|---|---|---|"]
    for site in sites:
        trained = metrics.get(f"train_patients/site/{site}")
        held = ", ".join(f"{c} {int(v)}" for c in cancers
                         if (v := metrics.get(f"eval_patients/site/{site}/{c}")) is not None)
        lines.append(f"| {site} | {'-' if trained is None else int(trained)} | {held or '-'} |")
    lines += ["", "## C-index on the held-out patients", "",
              "Protocol: each site keeps a seeded, stratified share of its patients out of training "
              f"(eval_fraction {job.settings.federation.eval_fraction}); it scores them with this round's global "
              "model and sends Harrell pair counts per cancer; pairs within a site and a cancer, summed over sites "
              "(site-stratified); 95% interval by the first-order jackknife over patients.", "",
              "| cancer | c-index | 95% interval | patients | deaths |", "|---|---|---|---|---|"]
    for cancer in [*cancers, "all"]:
        lines.append(f"| {cancer} | {_fmt(metrics.get(f'cindex/{cancer}'))} | "
                     f"[{_fmt(metrics.get(f'cindex_lower/{cancer}'))}, {_fmt(metrics.get(f'cindex_upper/{cancer}'))}]"
                     f" | {_count(metrics.get(f'eval_patients/{cancer}'))} | "
                     f"{_count(metrics.get(f'eval_events/{cancer}'))} |")
    return "\n".join(lines + _common_sections(state))


def _common_sections(state: dict[str, Any]) -> list[str]:
    groups = state.get("risk_groups") or {}
    config = state["config"]
    scaler = (state.get("genomic_scaler") or {}).get("mean", {})
    genes = ", ".join(f"{c}: {len(v)}" for c, v in sorted(scaler.items())) or "as in the training banks"
    return ["", "## Risk groups", "",
            (f"Quantiles {', '.join(f'{q:.3g}' for q in groups['quantiles'])} per cancer of {groups['source']}."
             if groups else "None stored."), "",
            "## Data schema", "",
            f"- Input: a patch bank (HDF5, schema version {SCHEMA_VERSION}): per patient its cancer (TCGA study), "
            f"WSI patch features of dimension {config['feature_dim']} with level-0 coords, and/or genomic values "
            f"per cancer (genes per cancer, from the standardization: {genes}). Survival data optional.",
            f"- Output: risk (higher = earlier death), risk group, and the survival probability at the end of each "
            f"time bin: {', '.join(bin_labels(state['edges']))}.",
            "- MLflow pyfunc: a DataFrame with columns `bank` (path) and `case_id` in, the same columns out.",
            "", "## Config", "", "```json", json.dumps(config, indent=1, sort_keys=True), "```", "",
            "## Known limits", "",
            "- A c-index on fewer than 10 deaths is unreliable (flagged with `few_events` in MLflow).",
            "- Without `validation_fraction` the best round is chosen on the held-out c-index: optimistic.",
            "- DPS has not been shown to find a prognostic region of 1% of a slide (README, Benchmarks).",
            "- Trained and checked on synthetic worlds and TCGA genomics; not validated for clinical use.", ""]


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _count(value: float | None) -> str:
    return "-" if value is None else str(int(value))


# --------------------------------------------------------------------------- centralized runs


def log_centralized_run(tracking_uri: str, experiment: str, results: dict[str, Any], out: Path,
                        params: dict[str, Any]) -> str:
    """One MLflow run for a `cmoe-train` run: its config as params, the evaluation c-index per cancer (the same
    metric names as the federation's, step 0), results.json, and ``model.pt`` as a pyfunc model ``model`` when the
    run made one model (not per fold). Returns the run id."""
    client = MlflowClient(tracking_uri)
    experiment_id = training_experiment(client, experiment, tracking_uri)
    run = client.create_run(experiment_id, run_name="centralized-training", tags={"cmoe.kind": "centralized"})
    run_id = run.info.run_id
    for key, value in flatten_params({"model": params}).items():
        client.log_param(run_id, key, value[:6000])
    metrics = {"cindex/all": results.get("eval_cindex"), "train_cindex": results.get("train_cindex")}
    lower, upper = results.get("eval_cindex_interval") or (None, None)
    metrics.update({"cindex_lower/all": lower, "cindex_upper/all": upper})
    for cancer, held in (results.get("eval_per_cancer") or {}).items():
        metrics.update({f"cindex/{cancer}": held.get("pooled_cindex"), f"cindex_lower/{cancer}": held.get("lower"),
                        f"cindex_upper/{cancer}": held.get("upper"), f"eval_patients/{cancer}": held.get("patients"),
                        f"eval_events/{cancer}": held.get("deaths")})
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(run_id, key, float(value), step=0)
    client.set_tag(run_id, "protocol", str(results.get("protocol", ""))[:5000])
    if (out / "results.json").exists():
        client.log_artifact(run_id, str(out / "results.json"))
    if (out / "model.pt").exists():
        log_model(client, run_id, out / "model.pt", "model")
    client.set_terminated(run_id, "FINISHED")
    return run_id


# --------------------------------------------------------------------------- from a URI back to the model file


def model_file_from_uri(uri: str, tracking_uri: str | None, download: Path) -> Path:
    """Download the MLflow model ``uri`` (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``runs:/<run id>/<path>``, or any artifact URI) into ``download`` and return our model file inside it."""
    from mlflow.artifacts import download_artifacts

    try:
        local = Path(download_artifacts(artifact_uri=_artifact_uri(uri, tracking_uri), dst_path=str(download),
                                        tracking_uri=tracking_uri))
    except PUBLISH_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(uri, f"cannot be fetched from MLflow ({first[:300]})") from None
    try:
        artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
        return local / artifacts[CHECKPOINT_KEY]["path"]
    except (MlflowException, OSError, KeyError, TypeError):
        raise InputError(uri, "is not a CancerMoE model (no MLmodel with a checkpoint artifact)") from None


def _artifact_uri(uri: str, tracking_uri: str | None) -> str:
    """A registered model's URI as the artifact URI of its version's source (the store named by ``tracking_uri``,
    which is also the registry); any other URI as given."""
    match = _MODELS_URI.match(uri)
    if match is None:
        return uri
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        version = (match["version"] if match["version"] else
                   client.get_model_version_by_alias(match["name"], match["alias"]).version)
        return client.get_model_version_download_uri(match["name"], version)
    except PUBLISH_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(uri, f"not found in the model registry at {tracking_uri} ({first[:300]})") from None
