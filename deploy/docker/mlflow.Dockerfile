# MLflow tracking server for CancerMoE-FL, backed by PostgreSQL (psycopg2) and serving the run artifacts.
#
#     docker build -f deploy/docker/mlflow.Dockerfile -t cancermoe-fl/mlflow:3.17.2 .
#
# Run it as `mlflow server --app-name cancermoe ...` (deploy/compose.yaml): MLflow's own server, whose UI opens
# experiments on the model-training pages (server/mlflow_app.py). For that app the image installs this repository
# without its dependencies (no torch, no flwr): the app imports MLflow only.
#
# Keep MLFLOW_VERSION at the version the coordinator's cancermoe-fl environment installs (the client that
# logs to this server): `docker compose run --rm --no-deps server pip show mlflow`.
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG MLFLOW_UID=10002

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9"
COPY pyproject.toml README.md /src/
COPY cancermoe /src/cancermoe
COPY client /src/client
COPY fedcommon /src/fedcommon
COPY server /src/server
RUN pip install --no-deps /src && rm -rf /src

RUN useradd --system --uid "${MLFLOW_UID}" --user-group --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
    && mkdir -p /var/lib/mlflow/artifacts \
    && chown -R mlflow:mlflow /var/lib/mlflow
USER mlflow
WORKDIR /var/lib/mlflow
EXPOSE 5000

CMD ["mlflow", "server", "--help"]
