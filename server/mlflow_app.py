"""``mlflow server --app-name cancermoe``: MLflow's own tracking server, opening on model training.

MLflow 3's web UI shows an experiment either as GenAI (traces, sessions) or
as model training (runs, metrics, artifacts). Since 3.18 the UI no longer
reads the experiment's ``mlflow.experimentKind`` tag to choose: it follows a
per-browser setting (localStorage ``mlflow.workflowType_v1``) that starts as
GenAI, or a ``?workflowType=`` in the URL. So a reviewer who opens a plain
link to our experiment in a browser that never used MLflow lands on GenAI's
empty Overview ("Send your first trace"). This app is MLflow's unchanged server (the same FastAPI app
`mlflow server` runs by default, under uvicorn) with one line added to the UI's
index page: a browser that holds no workflow choice gets model training; a
choice made in the UI's switch is never overridden.

Registered as the ``mlflow.app`` entry point ``cancermoe`` (pyproject.toml);
deploy/ starts MLflow with it. It imports MLflow only, so a tracking image can
install this package without its dependencies (torch, flwr).
"""

from __future__ import annotations

import json

from flask import Response, request
from mlflow.server import app as tracking_app
from mlflow.server.fastapi_app import app  # noqa: F401  what `mlflow server --app-name cancermoe` serves

WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage key: f"{key}_v{version}"
MODEL_TRAINING = "machine_learning"
# Runs before MLflow's bundle (the first thing in <head>); try/catch: a browser without localStorage just gets
# MLflow's own default.
_KEY, _VALUE = json.dumps(WORKFLOW_STORAGE_KEY), json.dumps(json.dumps(MODEL_TRAINING))  # JS literals
DEFAULT_WORKFLOW_SCRIPT = (f"<script>try{{if(window.localStorage.getItem({_KEY})===null)"
                           f"{{window.localStorage.setItem({_KEY},{_VALUE})}}}}catch(e){{}}</script>")
INDEX_ENDPOINT = "serve"  # the Flask view of mlflow.server that returns the UI's index.html


def with_model_training_default(html: str) -> str:
    """The UI's index page with the default-workflow script first in its ``<head>`` (unchanged if it has none,
    or already has the script)."""
    if DEFAULT_WORKFLOW_SCRIPT in html or "<head>" not in html:
        return html
    return html.replace("<head>", "<head>" + DEFAULT_WORKFLOW_SCRIPT, 1)


@tracking_app.after_request
def open_on_model_training(response: Response) -> Response:
    if request.endpoint != INDEX_ENDPOINT or response.status_code != 200 or response.mimetype != "text/html":
        return response
    response.direct_passthrough = False  # send_from_directory streams the file; we need its text
    response.set_data(with_model_training_default(response.get_data(as_text=True)))
    return response
