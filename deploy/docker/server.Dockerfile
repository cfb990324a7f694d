# CancerMoE-FL coordinator: cmoe-server (which starts Flower's SuperLink) and cmoe-certs.
#
# Build from the repository root (compose.yaml does this):
#     docker build -f deploy/docker/server.Dockerfile -t cancermoe-fl/server:0.1.0 .
#
# The coordinator aggregates on the CPU, so torch comes from PyTorch's CPU index (a few hundred MB instead of
# the CUDA build's several GB). It runs as an unprivileged user; the SuperLink it starts listens on loopback and
# is reached from the sites only through the nginx proxy that shares this container's network (compose.yaml).
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CMOE_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install --index-url "${TORCH_INDEX_URL}" torch

# Only what the package needs: no tests, banks, runs or virtual environments in the image.
WORKDIR /usr/src/cancermoe-fl
COPY pyproject.toml README.md ./
COPY cancermoe ./cancermoe
COPY client ./client
COPY fedcommon ./fedcommon
COPY server ./server
RUN pip install . && rm -rf /usr/src/cancermoe-fl

# Job folders (checkpoints, superlink.db, logs) live under /var/lib/cmoe, a volume owned by the service user.
RUN useradd --system --uid "${CMOE_UID}" --user-group --create-home --home-dir /home/cmoe --shell /usr/sbin/nologin cmoe \
    && mkdir -p /var/lib/cmoe \
    && chown cmoe:cmoe /var/lib/cmoe
USER cmoe
WORKDIR /var/lib/cmoe

CMD ["cmoe-server", "--help"]
