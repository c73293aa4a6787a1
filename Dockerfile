# syntax=docker/dockerfile:1
#
# twinserve container image: merged backbone + routed low-rank experts behind an OpenAI-compatible API.
#
# Targets (multi-stage):
#   runtime (default, last stage)  the server, no model inside; mount an artifact at /artifacts/<name>
#   demo                           runtime + the demo artifact baked in at /artifacts/demo
#                                  (runs `twinserve demo` at build time: about 4 min on 2 CPU cores)
#
# CPU build (default, what this repo's CI and deploy/build-image.sh use):
#   docker build -t twinserve:latest .
#   docker build --target demo -t twinserve:demo .
#
# CUDA build: a CUDA runtime base that has Python 3.11 (+ venv) and a CUDA torch wheel from PyTorch's
# index, for example
#   docker build \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" \
#     -t twinserve:cuda .
#   docker run --gpus all -e TWINSERVE_DEVICE=cuda ... twinserve:cuda
# (the base must provide `python3 -m venv`; on nvidia/cuda images install python3.11 + python3.11-venv
# first or start from a CUDA+Python base such as a pytorch/pytorch *-runtime image.)
# TORCH_SPEC is word-split on purpose so it can carry pip options (--index-url, --extra-index-url).
#
# Offline/air-gapped builds (CONTAINER_BASE in deploy/README.md): PIP_FIND_LINKS points pip at
# a local wheel folder and PIP_CERT at a CA bundle, both mounted into the build with `-v`. They are
# declared only in the build stages, so neither value nor mount ends up in the runtime image.
#
# Stopping: SIGTERM drains for TWINSERVE_DRAIN_TIMEOUT_S (30 s); give it 10 s more than that
# (`docker run --stop-timeout 40`, `docker stop -t 40`; deploy/README.md, "Stopping").

ARG BASE_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------ build
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv

# 1) torch alone and pinned: an unpinned torch resolved through the project's `torch>=2.3` would pull the
#    (multi-GB) default CUDA build on x86_64 PyPI.
# DL3013: the version pin lives in the TORCH_SPEC build arg (default torch==2.13.0), hadolint cannot see it.
# SC2086: TORCH_SPEC is split on purpose so that it can carry --index-url.
# hadolint ignore=DL3013,SC2086
RUN pip install ${TORCH_SPEC} \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 2) the project's dependencies only (cached layer: changes to the source do not reinstall them)
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && python -c "import torch; print('torch still', torch.__version__)"

# 3) the project itself, non-editable
COPY . /src
RUN pip install --no-deps /src \
    && pip check \
    && twinserve --help > /dev/null

# ------------------------------------------------------------------------------- demo-build
# Only built for `--target demo` (BuildKit and buildah skip stages the target does not need).
FROM build AS demo-build
# One thread: the demo models are tiny, and on a busy host OpenMP spin-waiting makes 2 threads far slower.
# DL3064: hadolint reads TOKENIZERS_PARALLELISM as a secret ("TOKEN"); it is a HF tokenizers switch.
# hadolint ignore=DL3064
ENV OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN twinserve demo --zoo /tmp/zoo -o /artifacts/demo \
    && rm -rf /tmp/zoo
# safetensors writes 0600 files: make the artifact readable for any uid (e.g. OpenShift's random uids)
RUN chmod -R a+rX /artifacts/demo

# ---------------------------------------------------------------------------------- runtime-base
FROM ${BASE_IMAGE} AS runtime-base

LABEL org.opencontainers.image.title="twinserve" \
      org.opencontainers.image.description="OpenAI-compatible inference server for Twin-Merging (merged backbone + routed low-rank experts)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Non-root user with a fixed uid/gid so Kubernetes securityContext (runAsUser/fsGroup) can match it.
RUN groupadd --system --gid 10001 twinserve \
    && useradd --system --uid 10001 --gid twinserve --home-dir /home/twinserve --create-home \
       --shell /usr/sbin/nologin twinserve \
    && mkdir -p /artifacts \
    && chown twinserve:twinserve /artifacts

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/twinserve-entrypoint
RUN chmod 0755 /usr/local/bin/twinserve-entrypoint

# Threads: torch would otherwise size its pools to the *host's* cores, not the container's CPU limit,
# and oversubscribe. 2 matches the default CPU limit of deploy/k8s and the Helm chart (which override it
# from limits.cpu through the downward API); raise it for bigger models/more cores.
# DL3064: hadolint reads TOKENIZERS_PARALLELISM as a secret ("TOKEN"); it is a HF tokenizers switch.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=2 \
    MKL_NUM_THREADS=2 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TWINSERVE_HOST=0.0.0.0 \
    TWINSERVE_PORT=8000 \
    TWINSERVE_ARTIFACT=/artifacts/demo \
    TWINSERVE_DEVICE=auto \
    TWINSERVE_DTYPE=auto

WORKDIR /home/twinserve
USER 10001:10001
EXPOSE 8000

# Liveness only (/health): /ready is for load balancers and Kubernetes readiness. No curl in slim images.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TWINSERVE_PORT', '8000'), timeout=4)"]

# `docker run IMAGE`              -> twinserve serve $TWINSERVE_ARTIFACT --host $TWINSERVE_HOST --port $TWINSERVE_PORT
# `docker run IMAGE serve [ARGS]` -> the same plus ARGS;  `docker run IMAGE demo -o /artifacts/demo` etc. -> twinserve ...
ENTRYPOINT ["twinserve-entrypoint"]
CMD ["serve"]

# ------------------------------------------------------------------------------------------ demo
FROM runtime-base AS demo
COPY --from=demo-build --chown=10001:10001 /artifacts/demo /artifacts/demo
VOLUME ["/artifacts"]

# --------------------------------------------------------------------------------------- runtime
# The default target (last stage): the server without a model; mount artifacts at /artifacts.
FROM runtime-base AS runtime
VOLUME ["/artifacts"]
