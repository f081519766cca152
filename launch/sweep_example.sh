#!/usr/bin/env bash
# Example: a Hydra multirun sweep on Slurm through hydra-submitit-launcher (pip install -e '.[slurm]').
# Run it on a login node; it submits one Slurm job per sweep point (a job array) and waits for all.
#
#   launch/sweep_example.sh                        # 2 x 2 grid: optimizer.lr x schedule.H
#   GPUS=8 PARTITION=gpu launch/sweep_example.sh trainer.max_steps=5000
#
# Each point gets one node with GPUS tasks (one per GPU), started by srun: the srun-native launch of
# launch/slurm_srun.sbatch, with ranks read by localsgd/dist.py from SLURM_PROCID, SLURM_LOCALID and
# SLURM_NTASKS. That path also needs MASTER_ADDR and MASTER_PORT, which neither Slurm nor submitit
# exports by itself (submitit.helpers.TorchDistributedEnvironment().export() would, but only when called
# inside the job, and localsgd does not call it), so the `setup` lines below export them in each
# job's batch script before srun. MASTER_PORT comes from the job id, so two jobs sharing a node do not
# collide.
#
# Each point's run directory is SWEEP_DIR/<job number>; rerunning the same command with the same
# SWEEP_DIR resumes every point from its newest checkpoint (finished points only re-evaluate).
#
# Time limits: Slurm warns the tasks with SUBMITIT_PREEMPT_SIGNAL, signal_delay_s (120 s) before the
# limit. Exporting USR1 makes that the signal localsgd handles: the ranks commit a checkpoint and exit
# 75. submitit does not requeue such a job; rerun the sweep (same SWEEP_DIR) to continue.
#
# Environment knobs (defaults in brackets):
#   GPUS          GPUs, and so tasks, per sweep point [4]
#   PARTITION     Slurm partition [the cluster's default]
#   TIME_MIN      time limit of each job in minutes [240]
#   SWEEP_DIR     sweep directory [outputs/sweeps/lr-H]
#   PYTHON        interpreter [python]
# Extra arguments are further Hydra overrides (or sweeps) for every point.
set -euo pipefail

GPUS=${GPUS:-4}
TIME_MIN=${TIME_MIN:-240}
SWEEP_DIR=${SWEEP_DIR:-outputs/sweeps/lr-H}
PYTHON=${PYTHON:-python}
export SUBMITIT_PREEMPT_SIGNAL=USR1

# shellcheck disable=SC2016  # the setup lines are expanded by the job's batch script, not here
launcher=(
    hydra/launcher=submitit_slurm
    hydra.launcher.nodes=1
    hydra.launcher.tasks_per_node="$GPUS"
    hydra.launcher.gpus_per_node="$GPUS"
    hydra.launcher.cpus_per_task=8
    hydra.launcher.timeout_min="$TIME_MIN"
    # Single quotes: $(...) and $((...)) must reach the job's batch script unexpanded.
    'hydra.launcher.setup=["export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)","export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))"]'
)
if [[ -n ${PARTITION:-} ]]; then
    launcher+=("hydra.launcher.partition=$PARTITION")
fi

exec "$PYTHON" -m localsgd.train -m "${launcher[@]}" \
    "hydra.sweep.dir=$SWEEP_DIR" \
    optimizer.lr=0.05,0.1 \
    schedule.H=4,16 \
    "$@"
