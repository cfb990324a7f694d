"""Experiment tracking for a federated training job, with MLflow, never in the way of training.

One MLflow run per job (the "job run"), and one nested child run per site, tagged ``mlflow.parentRunId`` so the
MLflow UI folds it under the job run, and ``cmoe.site`` so a resumed job finds it again.

Every call queues what it logs and then sends the queue in order. When the tracking server cannot be reached
(connection refused, timeout, HTTP 5xx, a locked SQLite file) the items stay queued, one warning is logged for
the outage, and they are sent on a later call or by ``flush()``, with their original steps and timestamps.
With ``buffer_dir`` the queue is also kept on disk (one JSON object a line), so items that a dead server
never saw survive a restart of the federated server: a tracker resuming the same run sends them first.
An item the server *rejects* (a bad metric name, a parameter whose value changed) is dropped with a warning:
retrying it could never succeed, and it would block everything queued behind it.

Conventions:
- The experiment is tagged as model training (``mlflow.experimentKind``), so MLflow 3 opens it on its runs.
- ``step`` is the federated round.
- Metric names use ``/`` for hierarchy: ``cindex/BRCA``, ``cindex_cross/BRCA``, ``cindex/site/A``,
  ``expert_load/3``, ``loss/train``, ``round_seconds``, ``bytes/up``. Characters MLflow refuses in a name are
  replaced by ``_``.
- Non-finite values (NaN, +-inf) are not logged: MLflow stores NaN but its charts draw it badly, and it
  silently clamps inf to the largest float. A c-index is NaN when a cancer has no comparable pair that round,
  so a gap in the chart is the honest picture.

Importing this module makes MLflow's HTTP client fail fast (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0,
MLFLOW_HTTP_REQUEST_TIMEOUT=5 s) and turns MLflow's usage telemetry off (MLFLOW_DISABLE_TELEMETRY), unless those
variables are already set in the environment: MLflow's defaults retry a dead server for minutes, during which
training would stand still, and hospital deployments phone home to no one. The timeout also bounds the wait for
the server's answer to an artifact upload; raise MLFLOW_HTTP_REQUEST_TIMEOUT if large checkpoints go through a
slow proxy.

A ``RunTracker`` is not thread-safe; the server calls it from its round loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Read by MLflow at each request (and telemetry at first use), so setting them before the import is enough.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import requests  # noqa: E402
import urllib3  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from cancermoe.errors import InputError  # noqa: E402
from cancermoe.files import write_text_atomically  # noqa: E402

log = logging.getLogger("cmoe.tracking")

PARENT_RUN_TAG = "mlflow.parentRunId"
SITE_TAG = "cmoe.site"
# MLflow 3 shows an experiment as model training (its runs) or as GenAI development (traces) by this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"
BUFFER_FILE_NAME = "mlflow-buffer.jsonl"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's own batch limits (mlflow.utils.validation): one queued item is one request.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_OR_TAGS_PER_BATCH = 100

# Error codes that mean "the server is not there right now", not "the server says no". MLflow reports a
# refused connection or an HTTP 5xx after its (disabled) retries as INTERNAL_ERROR.
_TRANSIENT_ERROR_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "SERVICE_UNDER_MAINTENANCE", "IO_ERROR", "DEADLINE_EXCEEDED",
    "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR",
})
_TRACKING_ERRORS = (MlflowException, requests.RequestException, urllib3.exceptions.HTTPError, OSError, SQLAlchemyError)
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w/.\- :]")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (``{"model": {"dim": 8}}`` -> ``{"model.dim": "8"}``); values are str()-ed."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def mlflow_safe_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric/param/tag name replaced by ``_``."""
    return _UNSAFE_NAME_CHARACTERS.sub("_", str(name))


def is_transient(error: BaseException) -> bool:
    """True when ``error`` means the tracking store is unreachable for now (retry later), not a refusal."""
    if isinstance(error, MlflowException):
        return error.error_code in _TRANSIENT_ERROR_CODES
    return isinstance(error, _TRACKING_ERRORS)


def default_artifact_location(tracking_uri: str) -> str | None:
    """``<dir of the .db>/mlartifacts`` for a SQLite store; None (the server decides) for anything else."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlartifacts").as_uri()


@dataclass
class _Item:
    """One queued request. ``site`` None means the job run; ``data`` is JSON-serialisable:
    params/tags: {name: value}; metrics: [[name, value, timestamp_ms, step], ...];
    artifact: {"path": absolute path, "artifact_path": folder in the run or None}; status: "RUNNING"/terminal."""

    kind: str
    site: str | None
    data: Any


class RunTracker:
    """One MLflow run per federated training job, a child run per site; buffered while the tracking server is down.

    Args:
        tracking_uri: ``sqlite:///<workdir>/mlflow.db`` (artifacts then go to ``<workdir>/mlartifacts``) or a
            tracking server such as ``http://127.0.0.1:5000``.
        experiment: MLflow experiment name; created when missing.
        run_name: display name of the job run.
        run_id: resume this run (``cmoe-server --resume`` continues the same MLflow run; it is set RUNNING
            again and its site runs are found by tag). If MLflow does not know it, a new run is started with a
            warning and ``run_id`` changes.
        buffer_dir: keep unsent items in ``<buffer_dir>/mlflow-buffer.jsonl`` so they outlive this process.
        retry_interval_s: after a failed send, logging calls queue without contacting the server for this long
            (a server that times out would otherwise cost the timeout on every call); ``flush()`` always tries.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        *,
        run_id: str | None = None,
        buffer_dir: Path | None = None,
        retry_interval_s: float = 30.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.retry_interval_s = retry_interval_s
        self._run_id = run_id
        self._run_checked = False  # a given run_id is verified (and set RUNNING) on first contact
        self._experiment_id: str | None = None
        self._site_run_ids: dict[str, str] = {}
        self._site_runs_searched = False
        self._sites: list[str] = []
        self._pending: deque[_Item] = deque()
        self._buffer_file = Path(buffer_dir) / BUFFER_FILE_NAME if buffer_dir is not None else None
        self._outage_started: float | None = None
        self._next_attempt = 0.0

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            # A SQLite store is opened (and created) here; a remote server is not contacted yet.
            self._client = MlflowClient(tracking_uri)
        except _TRACKING_ERRORS as error:
            raise InputError(f"tracking URI {tracking_uri}", _first_line(error)) from error
        self._load_buffer()
        # Create (or find) the run now so that run_id can be saved for --resume; a dead server defers it.
        if self._attempt(self._job_run_id):
            self.flush()

    # ----------------------------------------------------------------------------------------------- public API

    @property
    def run_id(self) -> str | None:
        """The job run's id; None only while a new run could not be created yet (tracking server down)."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The job run's experiment id, once the run was created or found."""
        return self._experiment_id

    @property
    def pending(self) -> int:
        """Number of queued requests not yet accepted by the tracking store."""
        return len(self._pending)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The effective run config; nested dicts flattened to dotted keys, values str()-ed.

        MLflow params are write-once: on resume, a key logged before with another value keeps its old value
        (warned), unchanged keys are skipped, new keys are added.
        """
        flat = {mlflow_safe_name(key): value for key, value in flatten_params(params).items()}
        keys = list(flat)
        for start in range(0, len(keys), MAX_PARAMS_OR_TAGS_PER_BATCH):
            chunk = {key: flat[key] for key in keys[start : start + MAX_PARAMS_OR_TAGS_PER_BATCH]}
            self._pending.append(_Item("params", None, chunk))
        self._send_if_due()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Job-level metrics of round ``step``; non-finite values are skipped (see the module docstring)."""
        self._queue_metrics(None, metrics, step)
        self._send_if_due()

    def site_run(self, site: str) -> str | None:
        """The child run of ``site`` (created, or found again on resume); None while the server is down."""
        if site not in self._sites:
            self._sites.append(site)
        if site in self._site_run_ids:
            return self._site_run_ids[site]
        if time.monotonic() >= self._next_attempt:
            self._attempt(lambda: self._site_run_id(site))
        return self._site_run_ids.get(site)

    def log_site_params(self, site: str, params: Mapping[str, Any]) -> None:
        """Params of ``site``'s child run (write-once, as `log_params`)."""
        if site not in self._sites:
            self._sites.append(site)
        flat = {mlflow_safe_name(key): value for key, value in flatten_params(params).items()}
        keys = list(flat)
        for start in range(0, len(keys), MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._pending.append(_Item("params", site, {key: flat[key] for key in
                                                        keys[start : start + MAX_PARAMS_OR_TAGS_PER_BATCH]}))
        self._send_if_due()

    def log_site_metrics(self, site: str, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of one site for round ``step``, in that site's child run (same names as the job run's)."""
        if site not in self._sites:
            self._sites.append(site)
        self._queue_metrics(site, metrics, step)
        self._send_if_due()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags on the job run (e.g. ``security/rejected_updates``); values str()-ed, a later value replaces."""
        items = [(mlflow_safe_name(key), str(value)) for key, value in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._pending.append(_Item("tags", None, dict(items[start : start + MAX_PARAMS_OR_TAGS_PER_BATCH])))
        self._send_if_due()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the job run's artifacts, under ``artifact_path``.

        The file is read when it is sent: while the server is down, a file rewritten in the meantime is sent
        in its newest state, and a file deleted in the meantime is skipped with a warning.
        """
        data = {"path": str(Path(path).resolve()), "artifact_path": artifact_path}
        self._pending.append(_Item("artifact", None, data))
        self._send_if_due()

    def flush(self) -> bool:
        """Send everything queued, in order, stopping at the first failure; True when nothing is left."""
        while self._pending:
            item = self._pending[0]
            try:
                self._send(item)
            except _TRACKING_ERRORS as error:
                if is_transient(error):
                    self._note_outage(error)
                    self._save_buffer()
                    return False
                log.warning("tracking store refused %s for %s, dropped: %s", item.kind, self._describe(item.site),
                            _first_line(error))
            self._pending.popleft()
        self._note_recovery()
        self._save_buffer()
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """End the site runs and the job run with ``status`` (FINISHED, FAILED or KILLED) and send everything.

        If the server is still down, the items stay queued (and in ``buffer_dir``, for a resuming tracker).
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        for site in self._sites:
            self._pending.append(_Item("status", site, status))
        self._pending.append(_Item("status", None, status))
        if not self.flush():
            kept = f"kept in {self._buffer_file}" if self._buffer_file is not None else "lost when this process exits"
            log.warning("tracking: %d item(s) could not be sent to %s; %s", len(self._pending), self.tracking_uri, kept)

    # ------------------------------------------------------------------------------------------ queue and send

    def _queue_metrics(self, site: str | None, metrics: Mapping[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        rows = []
        for name, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                rows.append([mlflow_safe_name(name), value, timestamp_ms, int(step)])
            else:
                log.debug("tracking: %s=%s at step %d not logged (not finite)", name, value, step)
        for start in range(0, len(rows), MAX_METRICS_PER_BATCH):
            self._pending.append(_Item("metrics", site, rows[start : start + MAX_METRICS_PER_BATCH]))

    def _send_if_due(self) -> None:
        if time.monotonic() >= self._next_attempt:
            self.flush()
        else:
            self._save_buffer()

    def _send(self, item: _Item) -> None:
        run_id = self._job_run_id() if item.site is None else self._site_run_id(item.site)
        if item.kind == "metrics":
            metrics = [Metric(name, value, timestamp_ms, step) for name, value, timestamp_ms, step in item.data]
            self._client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif item.kind == "params":
            self._send_params(run_id, item.data)
        elif item.kind == "tags":
            tags = [RunTag(key, value) for key, value in item.data.items()]
            self._client.log_batch(run_id, tags=tags, synchronous=True)
        elif item.kind == "artifact":
            self._send_artifact(run_id, Path(item.data["path"]), item.data["artifact_path"])
        elif item.kind == "status":
            if item.data == "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            else:
                self._client.set_terminated(run_id, status=item.data)
        else:
            raise ValueError(f"unknown tracking item kind {item.kind!r}")

    def _send_params(self, run_id: str, params: dict[str, str]) -> None:
        logged = self._client.get_run(run_id).data.params
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
        if changed:
            log.warning("tracking: params %s were logged before with other values; MLflow keeps the first ones",
                        ", ".join(changed))
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        if new:
            self._client.log_batch(run_id, params=new, synchronous=True)

    def _send_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(run_id, str(path), artifact_path)
        else:
            log.warning("tracking: artifact %s no longer exists, not logged", path)

    # ---------------------------------------------------------------------------------------------------- runs

    def _job_run_id(self) -> str:
        if self._run_id is not None and not self._run_checked:
            self._reopen_job_run()
        if self._run_id is None:
            self._experiment_id = self._experiment_id_for_new_run()
            run = self._client.create_run(self._experiment_id, run_name=self.run_name)
            self._run_id = run.info.run_id
            self._run_checked = True
            self._site_runs_searched = True  # a new run has no site runs yet
            self._save_buffer()  # the buffer's header names the run from now on
        return self._run_id

    def _reopen_job_run(self) -> None:
        try:
            run = self._client.get_run(self._run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("tracking: run %s not found at %s; starting a new run", self._run_id, self.tracking_uri)
            self._run_id = None
            return
        if run.info.status != "RUNNING":
            self._client.update_run(self._run_id, status="RUNNING")
        self._experiment_id = run.info.experiment_id
        self._run_checked = True

    def _experiment_id_for_new_run(self) -> str:
        return training_experiment(self._client, self.experiment, self.tracking_uri)

    def _site_run_id(self, site: str) -> str:
        if site in self._site_run_ids:
            return self._site_run_ids[site]
        job_run_id = self._job_run_id()
        if not self._site_runs_searched:
            self._find_site_runs(job_run_id)
        if site not in self._site_run_ids:
            run = self._client.create_run(
                self._experiment_id, run_name=site, tags={PARENT_RUN_TAG: job_run_id, SITE_TAG: site}
            )
            self._site_run_ids[site] = run.info.run_id
        return self._site_run_ids[site]

    def _find_site_runs(self, job_run_id: str) -> None:
        """Resuming: the site runs of an earlier process, reopened."""
        children = f"tags.`{PARENT_RUN_TAG}` = '{job_run_id}'"
        runs = self._client.search_runs([self._experiment_id], filter_string=children)
        for run in runs:
            site = run.data.tags.get(SITE_TAG)
            if site is None or site in self._site_run_ids:
                continue
            if run.info.status != "RUNNING":
                self._client.update_run(run.info.run_id, status="RUNNING")
            self._site_run_ids[site] = run.info.run_id
        self._site_runs_searched = True

    # ------------------------------------------------------------------------------------- outages and buffer

    def _attempt(self, action: Callable[[], object]) -> bool:
        """Run one tracking request outside the queue; False (and an outage noted) when the server is away."""
        try:
            action()
        except _TRACKING_ERRORS as error:
            if not is_transient(error):
                raise
            self._note_outage(error)
            return False
        return True

    def _note_outage(self, error: BaseException) -> None:
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning("tracking server %s unreachable (%s); buffering metrics and retrying, training goes on",
                        self.tracking_uri, _first_line(error))
        self._next_attempt = time.monotonic() + self.retry_interval_s

    def _note_recovery(self) -> None:
        if self._outage_started is not None:
            log.info("tracking server %s reachable again after %.0f s; buffered items sent",
                     self.tracking_uri, time.monotonic() - self._outage_started)
            self._outage_started = None
        self._next_attempt = 0.0

    def _describe(self, site: str | None) -> str:
        return f"run {self._run_id}" if site is None else f"site {site} of run {self._run_id}"

    def _save_buffer(self) -> None:
        """Mirror the queue to ``buffer_dir`` (atomically); no file when nothing is queued."""
        if self._buffer_file is None:
            return
        try:
            if not self._pending:
                self._buffer_file.unlink(missing_ok=True)
                return
            header = {"run_id": self._run_id, "run_name": self.run_name, "experiment": self.experiment}
            lines = [json.dumps(header)]
            lines += [json.dumps({"kind": item.kind, "site": item.site, "data": item.data}) for item in self._pending]
            self._buffer_file.parent.mkdir(parents=True, exist_ok=True)
            # Only the coordinator's account reads it (as the temporary file it replaced was).
            write_text_atomically(self._buffer_file, "\n".join(lines) + "\n", mode=0o600)
        except OSError as error:  # a full disk must not stop training either
            log.warning("tracking: could not write %s: %s", self._buffer_file, error)

    def _load_buffer(self) -> None:
        """Queue the items an earlier process of this same run left unsent."""
        if self._buffer_file is None or not self._buffer_file.is_file():
            return
        try:
            header, *rows = [json.loads(line) for line in self._buffer_file.read_text().splitlines() if line.strip()]
            items = [_Item(row["kind"], row["site"], row["data"]) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("tracking: ignoring unreadable buffer %s: %s", self._buffer_file, error)
            return
        if self._run_id is not None:
            same_run = header.get("run_id") == self._run_id
        else:  # that process never reached the server either: same job if same name
            same_run = header.get("run_id") is None and header.get("run_name") == self.run_name
        if not same_run:
            log.warning("tracking: discarding %d buffered item(s) of run %s (%s) in %s", len(items),
                        header.get("run_id"), header.get("run_name"), self._buffer_file)
            return
        # Their FINISHED/FAILED would end the run this process continues.
        self._pending.extend(item for item in items if item.kind != "status")
        for item in self._pending:
            if item.site is not None and item.site not in self._sites:
                self._sites.append(item.site)
        log.info("tracking: %d buffered item(s) from %s queued", len(self._pending), self._buffer_file)


def training_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (or restored) when needed and marked as a model-training experiment
    (`EXPERIMENT_KIND_TAG`), so MLflow 3 lists its runs rather than GenAI traces. An experiment of ours created
    before the tag existed gets it; one someone marked otherwise keeps their choice."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
        except MlflowException as error:  # another process created it in between
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    return experiment.experiment_id


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
