"""What a reviewer's MLflow dashboard shows of a federated job, read through a real `mlflow server`'s REST API
(what the UI itself reads): the experiment marked as model training, the run's description, a child run per site
with its params and per-round metrics, the figures, and one registered version however often the job finishes.

The job is the in-process federation (real strategy, Job, ClientApp; only the transport is replaced) logging to
the server over HTTP. The server runs our app (`--app-name cancermoe`, as deploy/ does), and headless Chromium
opens the experiment's plain link on it and on MLflow's stock server. `scripts/dashboard_screenshots.py` shows the
same store page by page.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import cancermoe
from cancermoe.cohort import labelled_patients, open_cohort
from cancermoe.config import load_config
from client.site import site_patients
from server.app import Job, JobSettings
from server.config import FederationConfig
from server.dashboard import DESCRIPTION_TAG, dashboard_url
from server.mlflow_app import DEFAULT_WORKFLOW_SCRIPT
from server.registry import MODEL_NAME
from server.tracking import EXPERIMENT_KIND_TAG, SITE_TAG, TRAINING_EXPERIMENT
from tests.federation_helpers import SMALL_MODEL, grid_of_sites, synth_site
from tests.test_tracking import MlflowServer

pytestmark = [pytest.mark.process, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

EXPERIMENT = "cancermoe-fl"
ROUNDS = 2


def post(server: MlflowServer, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def tags(entity: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in entity.get("tags", [])}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dashboard")
    empty = root / "empty"
    empty.mkdir()
    MlflowClient(f"sqlite:///{empty / 'mlflow.db'}")  # migrated once; the server starts on a copy
    server = MlflowServer(root, empty / "mlflow.db")
    server.start()
    sites = {"A": synth_site(root / "A.h5", 1, patients=40, cancers=("BRCA", "LUAD")),
             "B": synth_site(root / "B.h5", 2, patients=40, cancers=("LUAD", "KIRC"))}
    model = load_config(overrides=SMALL_MODEL)
    federation = FederationConfig(rounds=ROUNDS, min_sites=2, consolidate_round=1)
    settings = JobSettings(root / "server", server.url, EXPERIMENT, False, model, federation)
    grid = grid_of_sites(sites, root)
    job = Job(settings)
    job.run(grid)
    try:
        yield {"server": server, "job": job, "sites": sites, "model": model, "federation": federation,
               "settings": settings, "grid": grid}
    finally:
        server.stop()


def site_runs(server: MlflowServer, job: Job) -> dict[str, dict]:
    experiment_id = server.rest("runs/get", run_id=job.tracker.run_id)["run"]["info"]["experiment_id"]
    found = post(server, "runs/search", {"experiment_ids": [experiment_id],
                                         "filter": f"tags.`mlflow.parentRunId` = '{job.tracker.run_id}'"})
    return {tags(run["data"])[SITE_TAG]: run for run in found["runs"]}


def test_the_experiment_is_marked_as_model_training(dashboard) -> None:
    server = dashboard["server"]
    experiment = server.rest("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert tags(experiment)[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    url = dashboard_url(server.url, experiment["experiment_id"])
    assert url == f"{server.url}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"


def test_the_job_run_describes_the_job_and_its_result(dashboard) -> None:
    server, job = dashboard["server"], dashboard["job"]
    run = server.rest("runs/get", run_id=job.tracker.run_id)["run"]
    description = tags(run["data"])[DESCRIPTION_TAG]
    last = job.history[-1]["metrics"]
    assert description.startswith("**Federated training of CancerMoE**: 2 sites (A, B), 2 rounds of 1 local epoch")
    assert "**finished**: 2 of 2 rounds done" in description
    assert (f"Held-out c-index, round 2: **{last['cindex/all']:.3f}** [{last['cindex_lower/all']:.3f}, "
            f"{last['cindex_upper/all']:.3f}] on {int(last['eval_patients/all'])} patients") in description
    row = (f"| all | {last['cindex/all']:.3f} | [{last['cindex_lower/all']:.3f}, {last['cindex_upper/all']:.3f}] | "
           f"{int(last['eval_patients/all'])} | {int(last['eval_events/all'])} |")
    assert row in description
    assert f"| KIRC | {last['cindex/KIRC']:.3f} |" in description
    assert f"best.pt: round {job.best_round}." in description and "How best.pt was chosen: best.pt" in description
    assert f"Registered model: `models:/{MODEL_NAME}/1`" in description


def test_each_site_run_holds_its_params_and_its_metrics_of_every_round(dashboard) -> None:
    server, job = dashboard["server"], dashboard["job"]
    runs = site_runs(server, job)
    assert sorted(runs) == ["A", "B"]
    cancers = {"A": "BRCA,LUAD", "B": "KIRC,LUAD"}
    for site, run in runs.items():
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        cohort = labelled_patients(open_cohort([dashboard["sites"][site]]), "test", print)
        split = site_patients(cohort, dashboard["federation"].eval_fraction, 0.0, dashboard["model"].seed)
        assert params == {"version": cancermoe.__version__, "cancers": cancers[site],
                          "patients.trained": str(len(split.fit)), "patients.held_out": str(len(split.held)),
                          "events.trained": str(int((split.fit.censorship == 0).sum())),
                          "events.held_out": str(int((split.held.censorship == 0).sum()))}, site
        run_id = run["info"]["run_id"]
        for key in ("loss/train", "cindex/train", "train_patients", "train_events", "seconds/training",
                    "cindex", "cindex_lower", "cindex_upper", "eval_patients", "eval_events"):
            assert [step for step, _ in server.metric_history(run_id, key)] == list(range(1, ROUNDS + 1)), (site, key)
        assert {value for _, value in server.metric_history(run_id, "train_patients")} == {len(split.fit)}
        assert run["info"]["status"] == "FINISHED"
        # the same c-index the job run lists for the site
        assert server.metric_history(run_id, "cindex") == server.metric_history(job.tracker.run_id,
                                                                                 f"cindex/site/{site}")


def test_the_job_run_holds_the_figures_and_routing_as_shares(dashboard) -> None:
    server, job = dashboard["server"], dashboard["job"]
    listed = server.rest("artifacts/list", run_id=job.tracker.run_id, path="figures")["files"]
    assert sorted(a["path"] for a in listed) == ["figures/cindex_over_rounds.png", "figures/expert_routing.png",
                                                "figures/km_by_cancer.png"]
    query = urllib.parse.urlencode({"path": "figures/km_by_cancer.png", "run_uuid": job.tracker.run_id})
    with urllib.request.urlopen(f"{server.url}/get-artifact?{query}", timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = {m["key"]: m["value"] for m in server.rest("runs/get", run_id=job.tracker.run_id)["run"]["data"]
               ["metrics"]}
    wsi = [value for key, value in metrics.items() if key.startswith("expert_share/wsi/")]
    assert len(wsi) == dashboard["model"].n_experts and sum(wsi) == pytest.approx(1.0)
    assert not any(key.startswith("expert_tokens/") for key in metrics)  # no raw counts


def test_a_finished_job_resumed_registers_its_model_once(dashboard) -> None:
    server, job = dashboard["server"], dashboard["job"]
    resumed = Job(JobSettings(**{**dashboard["settings"].__dict__, "resume": True}))
    assert resumed.tracker.run_id == job.tracker.run_id
    resumed.run(dashboard["grid"])  # every round done: it only finishes again
    versions = server.rest("model-versions/search", filter=f"name='{MODEL_NAME}'")["model_versions"]
    assert [v["version"] for v in versions] == ["1"]
    run = server.rest("runs/get", run_id=job.tracker.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert tags(run["data"])["registered_model"] == f"models:/{MODEL_NAME}/1"


def test_cmoe_server_prints_the_link_that_opens_the_job_run_as_model_training(dashboard, capsys) -> None:
    from server.cli import print_results

    server, job = dashboard["server"], dashboard["job"]
    print_results(job.workdir, server.url, 10, 0.2)
    experiment_id = server.rest("runs/get", run_id=job.tracker.run_id)["run"]["info"]["experiment_id"]
    link = f"{server.url}/#/experiments/{experiment_id}/runs/{job.tracker.run_id}?workflowType=machine_learning"
    assert f"dashboard: {link}\n" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(chromium: str, url: str, profile: Path) -> str:
    """The visible text of ``url`` once headless Chromium (a fresh profile: a browser that never chose anything)
    has run its scripts."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--virtual-time-budget=15000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", done.stdout, flags=re.DOTALL)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_the_ui_makes_model_training_the_default_of_a_browser_that_never_chose(dashboard) -> None:
    with urllib.request.urlopen(f"{dashboard['server'].url}/", timeout=10) as response:
        html = response.read().decode()
    assert html.index(DEFAULT_WORKFLOW_SCRIPT) < html.index("<script defer")  # before MLflow's bundle runs
    assert html.count(DEFAULT_WORKFLOW_SCRIPT) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_a_plain_experiment_link_opens_the_training_runs_in_a_fresh_browser(dashboard, tmp_path) -> None:
    """The link a reviewer is sent (no ?workflowType): MLflow's stock server opens it on GenAI's empty Overview,
    ours (deploy's) on the runs of the job."""
    server, job = dashboard["server"], dashboard["job"]
    experiment_id = server.rest("runs/get", run_id=job.tracker.run_id)["run"]["info"]["experiment_id"]
    text = page_text(CHROMIUM, f"{server.url}/#/experiments/{experiment_id}", tmp_path / "fresh")
    assert "federated-training" in text, text[:2000]  # the job run, listed on the training runs page
    assert "Send your first trace" not in text and "Observability" not in text, text[:2000]
    stock = MlflowServer(tmp_path, Path(server.folder) / "server.db", app_name=None)
    stock.start()
    try:
        text = page_text(CHROMIUM, f"{stock.url}/#/experiments/{experiment_id}", tmp_path / "fresh-stock")
    finally:
        stock.stop()
    assert "Send your first trace" in text  # MLflow's own default: the check above could fail
