"""Experiment tracking against real MLflow stores: a SQLite file, and a real `mlflow server` that also goes down.

The tests that start an `mlflow server` process share one module-scoped server (a few seconds to start on two
cores) and are marked ``slow``; everything else uses a SQLite store in tmp_path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cancermoe.errors import InputError
from cancermoe.km_figure import KMCurve, KMPanel
from cancermoe.survival import km_counts
from server.dashboard import expert_shares
from server.plots import cindex_over_rounds_plot, expert_routing_plot, km_plot, routing_shares
from server.tracking import BUFFER_FILE_NAME, SITE_TAG, RunTracker, flatten_params

# MLflow's own SQLAlchemy models trip this; nothing in this project can act on it.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("hospital-A", "hospital-B")


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once: creating one costs seconds of schema migrations."""
    folder = tmp_path_factory.mktemp("empty-store")
    MlflowClient(sqlite_uri(folder))
    return folder / "mlflow.db"


@pytest.fixture
def uri(tmp_path, empty_store) -> str:
    """A fresh SQLite store of this test's own, in tmp_path (artifacts go to tmp_path/mlartifacts)."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return sqlite_uri(tmp_path)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def site_runs(client: MlflowClient, run_id: str) -> dict:
    experiment_id = client.get_run(run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {child.data.tags[SITE_TAG]: child for child in children}


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cmoe.tracking" and r.levelno == logging.WARNING]


def round_metrics(step: int) -> dict[str, float]:
    """Different, non-round numbers every step, so a value logged at the wrong step would show."""
    return {"cindex/BRCA": 0.5 + 0.07 * step, "loss/train": 1.0 / (step + 0.5), "bytes/up": 1000.0 * step + 17}


def cindex_png(folder: Path) -> Path:
    return cindex_over_rounds_plot({"BRCA": [(1, 0.55), (2, 0.61), (3, 0.64)]}, folder / "cindex.png")


# ------------------------------------------------------------------------------------------------- SQLite store


def test_sqlite_store_holds_params_metrics_site_runs_tags_and_artifacts(tmp_path, uri):
    config = {"rounds": 3, "model": {"dim": 8, "moe": {"experts": 4}}, "lr": 1e-3, "sites": list(SITES)}
    tracker = RunTracker(uri, "cancermoe", "job-1")
    tracker.log_params(config)
    for step in (1, 2, 3):
        tracker.log_metrics(round_metrics(step), step)
        for offset, site in enumerate(SITES):
            tracker.log_site_metrics(site, {"cindex/BRCA": 0.4 + 0.05 * step + offset / 10}, step)
    tracker.set_tags({"security/rejected_updates": 2})
    plot = cindex_png(tmp_path / "plots")
    tracker.log_artifact(plot, "plots")
    tracker.finish()
    assert tracker.pending == 0

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "job-1"
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(config)
    assert run.data.params["model.moe.experts"] == "4"
    assert run.data.tags["security/rejected_updates"] == "2"
    for key in round_metrics(1):
        assert history(client, tracker.run_id, key) == [(step, round_metrics(step)[key]) for step in (1, 2, 3)]

    children = site_runs(client, tracker.run_id)
    assert sorted(children) == sorted(SITES)
    for offset, site in enumerate(SITES):
        child = children[site]
        assert child.info.status == "FINISHED"
        assert child.info.run_name == site
        assert tracker.site_run(site) == child.info.run_id
        expected = [(step, 0.4 + 0.05 * step + offset / 10) for step in (1, 2, 3)]
        assert history(client, child.info.run_id, "cindex/BRCA") == expected

    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/cindex.png"]
    stored = list((tmp_path / "mlartifacts").rglob("cindex.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == plot.read_bytes()


@pytest.mark.fault
def test_resume_appends_to_the_same_run_and_site_runs(uri, caplog):
    first = RunTracker(uri, "cancermoe", "job")
    first.log_params({"rounds": 4})
    for step in (1, 2):
        first.log_metrics(round_metrics(step), step)
        first.log_site_metrics("hospital-A", {"cindex/BRCA": step / 10}, step)
    first.finish("KILLED")

    second = RunTracker(uri, "cancermoe", "job", run_id=first.run_id)
    assert second.run_id == first.run_id
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="cmoe.tracking"):
        second.log_params({"rounds": 5, "resumed_from_round": 2})
    assert any("rounds" in message for message in tracking_warnings(caplog))
    second.log_metrics(round_metrics(3), 3)
    second.log_site_metrics("hospital-A", {"cindex/BRCA": 0.3}, 3)
    second.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"rounds": "4", "resumed_from_round": "2"}  # MLflow params are write-once
    assert history(client, first.run_id, "cindex/BRCA") == [(s, round_metrics(s)["cindex/BRCA"]) for s in (1, 2, 3)]
    children = site_runs(client, first.run_id)
    assert list(children) == ["hospital-A"]  # found again, not duplicated
    assert history(client, children["hospital-A"].info.run_id, "cindex/BRCA") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert children["hospital-A"].info.status == "FINISHED"


def test_resuming_an_unknown_run_starts_a_new_one_with_a_warning(uri, caplog):
    with caplog.at_level(logging.WARNING, logger="cmoe.tracking"):
        tracker = RunTracker(uri, "cancermoe", "job", run_id="0123456789abcdef0123456789abcdef")
    assert tracker.run_id not in (None, "0123456789abcdef0123456789abcdef")
    assert any("not found" in message for message in tracking_warnings(caplog))
    assert MlflowClient(uri).get_run(tracker.run_id).info.run_name == "job"


@pytest.mark.bad_input
def test_an_unusable_tracking_uri_is_an_input_error():
    with pytest.raises(InputError, match="tracking URI nosuchstore://"):
        RunTracker("nosuchstore://somewhere", "cancermoe", "job")


def test_non_finite_metrics_are_skipped(uri):
    tracker = RunTracker(uri, "cancermoe", "job")
    tracker.log_metrics({"cindex/BRCA": math.nan, "cindex/LUAD": 0.62, "loss/train": math.inf}, 1)
    tracker.log_metrics({"cindex/BRCA": 0.58, "cindex/LUAD": np.float32(0.25)}, 2)
    tracker.log_site_metrics("hospital-A", {"cindex/BRCA": float("nan"), "cindex/LUAD": 0.7}, 1)
    client = MlflowClient(uri)
    assert history(client, tracker.run_id, "cindex/BRCA") == [(2, 0.58)]
    assert history(client, tracker.run_id, "cindex/LUAD") == [(1, 0.62), (2, 0.25)]
    assert history(client, tracker.run_id, "loss/train") == []
    child = tracker.site_run("hospital-A")
    assert history(client, child, "cindex/BRCA") == [] and history(client, child, "cindex/LUAD") == [(1, 0.7)]


def test_names_mlflow_refuses_are_made_safe_not_dropped(uri):
    tracker = RunTracker(uri, "cancermoe", "job")
    tracker.log_metrics({"cindex/site/St. Mary's (ICU)": 0.6}, 1)
    assert tracker.pending == 0
    assert history(MlflowClient(uri), tracker.run_id, "cindex/site/St. Mary_s _ICU_") == [(1, 0.6)]


@pytest.mark.fault
def test_buffer_file_outlives_the_process_and_is_sent_by_the_next_tracker(tmp_path, uri, caplog):
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="cmoe.tracking"):
        lost = RunTracker(dead_url, "cancermoe", "job", buffer_dir=tmp_path / "work", retry_interval_s=0)
        lost.log_params({"rounds": 2})
        for step in (1, 2):
            lost.log_metrics(round_metrics(step), step)
            lost.log_site_metrics("hospital-B", {"cindex/BRCA": step / 4}, step)
        lost.finish()
    assert lost.run_id is None and lost.pending > 0
    assert len(tracking_warnings(caplog)) == 2  # the outage, and what finish() could not send
    buffer = tmp_path / "work" / BUFFER_FILE_NAME
    assert buffer.is_file()
    del lost  # the server process dies; its buffer file stays

    tracker = RunTracker(uri, "cancermoe", "job", buffer_dir=tmp_path / "work")
    assert tracker.pending == 0 and not buffer.exists()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"rounds": "2"}
    assert run.info.status == "RUNNING"  # the dead process's FINISHED does not end the continuing run
    assert history(client, tracker.run_id, "bytes/up") == [(s, round_metrics(s)["bytes/up"]) for s in (1, 2)]
    child = site_runs(client, tracker.run_id)["hospital-B"]
    assert history(client, child.info.run_id, "cindex/BRCA") == [(1, 0.25), (2, 0.5)]


# ------------------------------------------------------------------------------------------------------- plots


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    edges = np.append(np.arange(0.0, 62.0, 2.0), np.inf)

    def group(name: str, hazard: float) -> KMCurve:
        months = rng.exponential(1 / hazard, size=30)
        return KMCurve.from_counts(name, km_counts(months, (months > 40).astype(int), edges))

    panels = [KMPanel("BRCA", [group("high", 0.08), group("low", 0.02)], 0.003),
              KMPanel("LUAD", [group("high", 0.05), group("low", 0.03)], math.nan)]
    paths = [
        km_plot(panels, tmp_path / "km.png", title="round 2"),
        expert_routing_plot(rng.integers(0, 100, size=(2, 8)), ["wsi", "genomics"], tmp_path / "routing.png"),
        cindex_png(tmp_path),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cindex.png", "km.png", "routing.png"]  # no temp files
    with pytest.raises(ValueError, match="modality"):
        expert_routing_plot(np.ones((3, 8)), ["wsi", "genomics"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_expert_routing_is_shown_as_shares_of_each_modality():
    counts = np.array([[10.0, 30.0, 0.0, 0.0], [4000.0, 1000.0, 3000.0, 2000.0], [0.0, 0.0, 0.0, 0.0]])
    shares = routing_shares(counts)
    np.testing.assert_allclose(shares[0], [0.25, 0.75, 0, 0])
    np.testing.assert_allclose(shares[1], [0.4, 0.1, 0.3, 0.2])
    assert not shares[2].any()  # a modality that routed nothing has no share, not NaN
    metrics = expert_shares(counts, ("cls", "wsi", "genomics"))
    assert metrics["expert_share/cls/1"] == 0.75 and metrics["expert_share/wsi/0"] == 0.4
    assert not any(key.startswith("expert_share/genomics/") for key in metrics)


def test_round_axes_have_whole_numbers_only(tmp_path, monkeypatch):
    import server.plots as plots

    ticks = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: ticks.extend(figure.axes[0].get_xticks()) or path)
    cindex_over_rounds_plot({"BRCA": [(1, 0.55), (2, 0.61), (3, 0.64)]}, tmp_path / "c.png")
    assert [t for t in ticks if 1 <= t <= 3] and all(float(t).is_integer() for t in ticks), ticks  # no 1.5


# ----------------------------------------------------------------------------------- a real `mlflow server`


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a fixed port and store, which can be stopped and started again. ``app_name``: the
    ``--app-name`` it runs, ours by default (what deploy/ runs: server/mlflow_app.py); None: MLflow's stock app."""

    def __init__(self, folder: Path, empty_store: Path, app_name: str | None = "cancermoe") -> None:
        self.app_name = app_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = folder
        shutil.copyfile(empty_store, folder / "server.db")  # spares the server the schema migrations
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
            "--default-artifact-root", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            *(["--app-name", self.app_name] if self.app_name else []),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log_file = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the child process owns it
        # Its own process group: `mlflow server` runs uvicorn as a child, and both must go on stop().
        self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=env, start_new_session=True)
        log_file.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy within 60 s")

    def stop(self, crash: bool = False) -> None:
        """SIGTERM; ``crash``: SIGKILL, a server that dies without a word."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def rest(self, endpoint: str, **query: str) -> dict:
        """GET ``/api/2.0/mlflow/<endpoint>``: what the dashboard reads."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        metrics = self.rest("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted((int(m["step"]), m["value"]) for m in metrics)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, empty_store):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), empty_store)
    server.start()
    yield server
    server.stop()


@pytest.mark.process
@pytest.mark.slow
def test_metrics_logged_through_a_tracking_server_are_served_by_its_rest_api(mlflow_server, tmp_path):
    tracker = RunTracker(mlflow_server.url, "cancermoe-http", "job-http")
    for step in (1, 2, 3):
        tracker.log_metrics(round_metrics(step), step)
        tracker.log_site_metrics("hospital-A", {"cindex/BRCA": step / 8}, step)
    tracker.log_artifact(cindex_png(tmp_path), "plots")
    tracker.finish()
    assert tracker.pending == 0

    expected = [(step, round_metrics(step)["cindex/BRCA"]) for step in (1, 2, 3)]
    assert mlflow_server.metric_history(tracker.run_id, "cindex/BRCA") == expected
    run = mlflow_server.rest("runs/get", run_id=tracker.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    child_id = tracker.site_run("hospital-A")
    child = mlflow_server.rest("runs/get", run_id=child_id)["run"]
    assert {"key": "mlflow.parentRunId", "value": tracker.run_id} in child["data"]["tags"]
    assert mlflow_server.metric_history(child_id, "cindex/BRCA") == [(1, 0.125), (2, 0.25), (3, 0.375)]
    artifacts = mlflow_server.rest("artifacts/list", run_id=tracker.run_id, path="plots")["files"]
    assert [a["path"] for a in artifacts] == ["plots/cindex.png"]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.fault
def test_a_server_outage_buffers_metrics_and_they_arrive_with_their_steps_when_it_returns(mlflow_server, caplog):
    tracker = RunTracker(mlflow_server.url, "cancermoe-http", "job-outage", retry_interval_s=0)
    tracker.log_metrics(round_metrics(1), 1)
    tracker.log_site_metrics("hospital-B", {"cindex/BRCA": 0.51}, 1)
    mlflow_server.stop(crash=True)
    try:
        with caplog.at_level(logging.WARNING, logger="cmoe.tracking"):
            for step in (2, 3):
                started = time.monotonic()
                tracker.log_metrics(round_metrics(step), step)
                tracker.log_site_metrics("hospital-B", {"cindex/BRCA": 0.5 + step / 100}, step)
                assert time.monotonic() - started < 3.0  # training is not held up
        warnings = tracking_warnings(caplog)
        assert len(warnings) == 1 and "unreachable" in warnings[0]
        assert tracker.pending == 4
        assert tracker.flush() is False  # still down
    finally:
        mlflow_server.start()  # same port, same store

    assert tracker.flush() is True and tracker.pending == 0
    assert len(tracking_warnings(caplog)) == 1
    for key in round_metrics(1):
        expected = [(step, round_metrics(step)[key]) for step in (1, 2, 3)]
        assert mlflow_server.metric_history(tracker.run_id, key) == expected
    child_id = tracker.site_run("hospital-B")
    assert mlflow_server.metric_history(child_id, "cindex/BRCA") == [(1, 0.51), (2, 0.52), (3, 0.53)]
