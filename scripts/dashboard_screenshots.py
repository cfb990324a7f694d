"""Screenshots of the MLflow dashboard of a small federated job, taken by a real headless Chromium.

    python scripts/dashboard_screenshots.py --out shots/            # builds a small job, then photographs it
    python scripts/dashboard_screenshots.py --out shots/ --workdir /tmp/cmoe-dash   # keeps (and reuses) the store

It starts a real `mlflow server` on a SQLite store in ``--workdir``; when that store holds no job yet, it runs a
small in-process federation (two synthetic sites, the real strategy, Job and ClientApp, only the transport
replaced: tests/federation_helpers.py) that logs to the server over HTTP as `cmoe-server` does. Then Chromium
(``--chromium``, default: `chromium` on PATH; Debian: ``apt-get install chromium``) saves one PNG per page:

- ``01-experiments.png``        the experiment list
- ``02-experiment-no-param.png`` the experiment opened by its plain URL in a browser that never chose a workflow
                               (the server runs `--app-name cancermoe`, as deploy/ does: the training runs)
- ``03-experiment.png``         the experiment by `server.tracking.dashboard_url` (what the README tells people)
- ``04-job-run.png``            the job run: description, params, metrics
- ``05-job-run-charts.png``     the job run's metric charts (x axis: round)
- ``06-site-run.png``           a site's child run: its params and per-round metrics
- ``06b-site-run-charts.png``   ... and its metric charts
- ``07-km-figure.png``          the job run's artifacts, showing the KM figure
- ``08-expert-routing.png``     ... the expert routing figure
- ``09-cindex-over-rounds.png`` ... the c-index over rounds

and prints where they are. Each page is loaded in a fresh browser profile (no remembered settings).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "cancermoe-fl"


def build_job(workdir: Path, tracking_uri: str, rounds: int) -> None:
    """A small federation (two sites, ``rounds`` rounds) logged to ``tracking_uri``."""
    from cancermoe.config import load_config
    from server.app import Job, JobSettings
    from server.config import FederationConfig
    from tests.federation_helpers import SMALL_MODEL, grid_of_sites, synth_site

    sites = {"A": synth_site(workdir / "A.h5", 1, patients=60, cancers=("BRCA", "LUAD")),
             "B": synth_site(workdir / "B.h5", 2, patients=60, cancers=("LUAD", "KIRC"))}
    model = load_config(overrides=SMALL_MODEL)
    federation = FederationConfig(rounds=rounds, min_sites=2, consolidate_round=1)
    Job(JobSettings(workdir / "server", tracking_uri, EXPERIMENT, False, model, federation)).run(
        grid_of_sites(sites, workdir))


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cmoe-chromium-") as profile:
        # Without --run-all-compositor-stages-before-draw MLflow's metric charts are still spinners when it shoots.
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--run-all-compositor-stages-before-draw",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                   f"--screenshot={path}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if not path.exists():
        raise RuntimeError(f"chromium saved no screenshot of {url}: {result.stderr[-1000:]}")
    print(f"{path}  <-  {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--workdir", type=Path, help="the store and job folder (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--size", default="1600,1000", help="browser window, WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = parser.parse_args()
    if not args.chromium:
        parser.error("no chromium on PATH (Debian: apt-get install chromium); name one with --chromium")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from mlflow.tracking import MlflowClient

    from server.dashboard import dashboard_url
    from server.tracking import SITE_TAG
    from tests.test_tracking import MlflowServer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cmoe-dashboard-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "server.db"
    fresh = not store.exists()
    if fresh:
        empty = workdir / "empty"
        empty.mkdir(exist_ok=True)
        MlflowClient(f"sqlite:///{empty / 'mlflow.db'}")  # migrate the schema once
        source = empty / "mlflow.db"
    else:  # MlflowServer starts on a copy of the store it is given, as server.db: give it this one's copy
        source = Path(shutil.copyfile(store, workdir / "previous.db"))
    server = MlflowServer(workdir, source)
    server.start()
    failed = []
    try:
        if fresh:
            build_job(workdir, server.url, args.rounds)
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        eid = experiment.experiment_id
        runs = client.search_runs([eid], order_by=["attributes.start_time DESC"])
        job = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        site = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == job.info.run_id
                    and r.data.tags.get(SITE_TAG) == "A")
        ml = "?workflowType=machine_learning"
        run_page = f"{server.url}/#/experiments/{eid}/runs/{job.info.run_id}"
        pages = {
            "01-experiments.png": f"{server.url}/#/experiments{ml}",
            "02-experiment-no-param.png": f"{server.url}/#/experiments/{eid}",
            "03-experiment.png": dashboard_url(server.url, eid),
            "04-job-run.png": dashboard_url(server.url, eid, job.info.run_id),
            "05-job-run-charts.png": f"{run_page}/model-metrics{ml}",
            "06-site-run.png": dashboard_url(server.url, eid, site.info.run_id),
            "06b-site-run-charts.png": f"{server.url}/#/experiments/{eid}/runs/{site.info.run_id}/model-metrics{ml}",
            "07-km-figure.png": f"{run_page}/artifacts/figures/km_by_cancer.png{ml}",
            "08-expert-routing.png": f"{run_page}/artifacts/figures/expert_routing.png{ml}",
            "09-cindex-over-rounds.png": f"{run_page}/artifacts/figures/cindex_over_rounds.png{ml}",
        }
        args.out.mkdir(parents=True, exist_ok=True)
        width, height = args.size.split(",")
        for name, url in pages.items():
            tall = name in ("04-job-run.png", "06-site-run.png")
            wide = name == "07-km-figure.png"  # the three KM panels side by side
            try:
                screenshot(args.chromium, url, args.out / name,
                           f"{2400 if wide else width},{1700 if tall else height}", args.wait_ms)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                failed.append(f"{name}: {str(error).splitlines()[0]}")
    finally:
        server.stop()
    print(f"store: sqlite:///{store} (artifacts in {workdir / 'artifacts'})")
    if failed:
        sys.exit("no screenshot of " + "; ".join(failed))


if __name__ == "__main__":
    main()
