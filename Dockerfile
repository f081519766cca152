# syntax=docker/dockerfile:1
# GPU image: CUDA PyTorch from the base image, localsgd installed editable (so configs/ at the
# repository root is found next to the package, as with `make setup`), run as a non-root user.
#
#   docker build -t localsgd:gpu .
#   docker run --rm --gpus all --ipc=host -v "$PWD/outputs:/app/outputs" localsgd:gpu
#   docker run --rm --gpus all --ipc=host localsgd:gpu bash launch/local.sh data=digits model=mlp trainer=smoke
#
# The default command is the main job through launch/local.sh: one worker per visible GPU.
# --ipc=host (or a large --shm-size) because NCCL and DataLoader workers use shared memory.
#
# Base image: a tag can move; for reproducible builds pin it by digest:
#   docker buildx imagetools inspect pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime   # shows the digest
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime@sha256:<digest> .
# torch must be >= 2.4 (pyproject.toml); launch/slurm.sbatch passes SIGUSR1 through torchrun only on
# versions with `torchrun --signals-to-handle`, and falls back to SIGTERM otherwise.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LOCALSGD_CACHE_DIR=/app/.cache/localsgd

# uid 1000 (some base images already have a user with that uid; then use it).
RUN if ! getent passwd 1000 >/dev/null; then useradd --create-home --uid 1000 --shell /bin/bash localsgd; fi \
 && mkdir -p /app && chown 1000:1000 /app
WORKDIR /app

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: an empty placeholder
# package lets pip install the project's requirements before the source is copied. torch is already in
# the base image and satisfies torch>=2.4, so pip keeps that CUDA build.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir localsgd && touch localsgd/__init__.py \
 && python -m pip install -e '.[slurm]' \
 && rm -rf localsgd localsgd.egg-info

# The source last; re-register the editable install (cheap, no dependencies).
COPY --chown=1000:1000 . .
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps -e . \
 && mkdir -p outputs "$LOCALSGD_CACHE_DIR" \
 && chown 1000:1000 outputs "$LOCALSGD_CACHE_DIR" "$(dirname "$LOCALSGD_CACHE_DIR")"

USER 1000
CMD ["bash", "launch/local.sh"]
