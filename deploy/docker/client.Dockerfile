# CancerMoE-FL hospital site: cmoe-client (which runs a Flower SuperNode next to the patch bank).
#
# Build from the repository root (compose.yaml does this):
#     docker build -f deploy/docker/client.Dockerfile -t cancermoe-fl/client:0.1.0 .
# Run with a GPU: docker run --gpus all ... (NVIDIA Container Toolkit on the host); without one it trains on
# the CPU (cmoe-client --device auto).
#
# The base is NVIDIA's CUDA "base" image: it carries the CUDA version check and the variables the NVIDIA
# Container Toolkit reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES). The CUDA libraries themselves
# come with PyTorch's CUDA wheels, so the larger "runtime" image would only hold a second copy of them.
# Ubuntu 22.04 has no Python 3.11 package, so uv installs a standalone CPython 3.11.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04
ARG UV_VERSION=0.8.14

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${CUDA_IMAGE}

# Any PyTorch CUDA index (cu118, cu121, cu124, cu126, ...) that the site's NVIDIA driver supports.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG CMOE_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PATH=/opt/cmoe/bin:${PATH}

COPY --from=uv /uv /usr/local/bin/uv

RUN uv python install 3.11 \
    && uv venv --python 3.11 /opt/cmoe \
    && uv pip install --python /opt/cmoe/bin/python --index-url "${TORCH_INDEX_URL}" torch

WORKDIR /usr/src/cancermoe-fl
COPY pyproject.toml README.md ./
COPY cancermoe ./cancermoe
COPY client ./client
COPY fedcommon ./fedcommon
COPY server ./server
RUN uv pip install --python /opt/cmoe/bin/python . && rm -rf /usr/src/cancermoe-fl

# Site state (DPS score cache, snapshots, audit.jsonl, logs) lives under /var/lib/cmoe, a volume owned by the
# service user. cmoe-client writes a small launcher there and runs it: do not mount it noexec.
RUN useradd --system --uid "${CMOE_UID}" --user-group --create-home --home-dir /home/cmoe --shell /usr/sbin/nologin cmoe \
    && mkdir -p /var/lib/cmoe \
    && chown cmoe:cmoe /var/lib/cmoe
USER cmoe
WORKDIR /var/lib/cmoe

CMD ["cmoe-client", "--help"]
