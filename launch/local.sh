#!/usr/bin/env bash
# Train on one node with torchrun (torch.distributed.run): NPROC worker processes, one per GPU, or
# Gloo workers on the CPU when there is no GPU.
#
#   launch/local.sh [hydra overrides...]
#   NPROC=4 RUN_DIR=outputs/my-run launch/local.sh data=digits model=mlp trainer=smoke
#
# Environment knobs (defaults in brackets):
#   NPROC         worker processes [GPUs listed by `nvidia-smi -L`, else 2]
#   RUN_DIR       run directory, passed as hydra.run.dir [the config's outputs/runs/<date>_<time>_<run id>].
#                 Launching again with a RUN_DIR that holds checkpoints resumes from the newest one.
#   MAX_RESTARTS  torchrun restarts of the whole worker group after a worker fails [0]
#   PYTHON        interpreter [the repository's .venv/bin/python if present, else python3]
# Every argument is passed to localsgd.train as a Hydra override.
#
# Stopping: SIGTERM (or Ctrl-C's SIGINT) reaches torchrun, which passes it on to the workers. On SIGTERM
# they commit a checkpoint at the next averaging round and exit 75; torchrun itself then exits non-zero.
# Run the same command with the same RUN_DIR to resume.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

if [[ -z ${NPROC:-} ]]; then
    gpus=$(count_gpus)
    NPROC=$(( gpus > 0 ? gpus : 2 ))
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo_root/.venv/bin/python ]]; then
        PYTHON=$repo_root/.venv/bin/python
    else
        PYTHON=python3
    fi
fi

overrides=()
if [[ -n ${RUN_DIR:-} ]]; then
    overrides+=("hydra.run.dir=$RUN_DIR")
fi

# (${a[@]+"${a[@]}"} expands an empty array safely under `set -u` on bash < 4.4 too.)
# exec: torchrun becomes this process, so signals sent to the script reach it directly.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    --max-restarts="$MAX_RESTARTS" -m localsgd.train ${overrides[@]+"${overrides[@]}"} "$@"
