# syntax=docker/dockerfile:1
#
# unlearn-serve GPU image.
#
#   docker build -t unlearn-serve:0.1.0 .
#   docker run --rm --gpus all -p 8000:8000 -e UNLEARN_API_KEY -e HF_TOKEN \
#     -v unlearn-models:/models -v "$PWD/artifacts:/artifacts:ro" \
#     unlearn-serve:0.1.0 serve --host 0.0.0.0 --port 8000 --model HuggingFaceTB/SmolLM2-1.7B-Instruct
#
# The torch wheel brings its own CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ...); the host only has to
# provide the NVIDIA driver (through the NVIDIA Container Toolkit). The CUDA "base" image adds the
# NVIDIA_* environment the toolkit needs and makes the container refuse to start on a driver too old for
# its CUDA version (NVIDIA_REQUIRE_CUDA), so keep CUDA_IMAGE and TORCH_INDEX_URL on the same CUDA release:
#   CUDA 13.0 (default):  driver >= 580
#   CUDA 12.8: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#              --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  (driver >= 570;
#              pick a TORCH_VERSION that is published for that index)
# Pin CUDA_IMAGE by digest (name:tag@sha256:...) in production builds.
# No secrets are baked in: API keys (UNLEARN_API_KEY) and HF_TOKEN come from the runtime environment.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# builder: a venv at /opt/venv with torch (for the CUDA index), the dependencies, then the package itself
# ---------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG DEBIAN_FRONTEND=noninteractive

# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11). Versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1) torch first, from the CUDA-specific index (the biggest layer; changes only with TORCH_*).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2) the runtime dependencies + the `quant` extra (bitsandbytes), read from pyproject.toml, so this layer
#    is rebuilt only when pyproject.toml changes. torch is already satisfied and is not replaced.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['quant']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# 3) the package (non-editable; the source tree does not reach the final image). .dockerignore keeps
#    venvs, weights, caches and bench outputs out of the context.
#    (DL3013 "pin versions" does not apply: "." is this source tree, its dependencies were pinned by step 2.)
COPY . ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps ".[quant]" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && unlearn-serve serve --help > /dev/null

# ---------------------------------------------------------------------------------------------------------
# runtime: same base (same /usr/bin/python3 the venv points at), the venv, a non-root user
# ---------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 unlearn \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/unlearn --shell /usr/sbin/nologin unlearn \
    && mkdir -p /models/hf-cache /artifacts \
    && chown -R 10001:10001 /models /artifacts

COPY --from=builder /opt/venv /opt/venv

# HF_HOME lives on the /models volume so downloaded weights survive container restarts.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/hf-cache \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# Numeric UID so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/unlearn

VOLUME ["/models", "/artifacts"]
EXPOSE 8000

# Liveness only (/health). Readiness (/ready: 503 until the model is loaded and while draining) is for load
# balancers / Kubernetes. The start period covers slow first-time model downloads.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop / Kubernetes) makes the server drain: /ready turns 503, in-flight requests finish,
# exit 0. Give it time: `docker stop -t 120`, compose `stop_grace_period`, k8s terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["unlearn-serve"]
# Default: serve a model mounted (or cached) at /models/model. Arguments to `docker run IMAGE ...` replace
# this whole CMD, so repeat --host 0.0.0.0 --port 8000 there (the CLI's default host is 127.0.0.1).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/model", "--artifact-root", "/artifacts"]
