# syntax=docker/dockerfile:1
# GPU image: CUDA PyTorch from the base image, localsgd installed from its wheel (not editable, configs
# inside the package, as `pip install .` does for a user), run as a non-root user.
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

# Stage 1: the wheel, built from what it packages (code, configs, metadata) and nothing else.
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md MANIFEST.in ./
COPY build_backend build_backend
COPY localsgd localsgd
COPY configs configs
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --no-deps --wheel-dir /dist .

# Stage 2: the image.
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

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: the requirements are read
# from it (tomllib: Python >= 3.11, as in the base image). torch is already in the base image and
# satisfies torch>=2.4, so pip keeps that CUDA build.
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['slurm'], sep=chr(10))" > /tmp/requirements.txt \
 && python -m pip install -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt

# The package itself (its requirements are already met, so pip only checks them). /app holds no
# source tree, so `python -m localsgd.train` imports the installed package and reads its packaged
# configs; the launch scripts are the only files copied from the repository.
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    whl=$(echo /tmp/dist/localsgd-*.whl) \
 && python -m pip install --no-cache-dir "${whl}[slurm]"
COPY --chown=1000:1000 launch launch
RUN mkdir -p outputs "$LOCALSGD_CACHE_DIR" \
 && chown 1000:1000 outputs "$LOCALSGD_CACHE_DIR" "$(dirname "$LOCALSGD_CACHE_DIR")"

USER 1000
CMD ["bash", "launch/local.sh"]
