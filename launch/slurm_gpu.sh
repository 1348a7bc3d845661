#!/usr/bin/env bash
# A jaxft run on a SLURM GPU cluster: one process per node (all its GPUs) by default, or one per
# GPU. The coordinator is the job's first node; every process gets JAXFT_COORDINATOR,
# JAXFT_NUM_PROCESSES and its JAXFT_PROCESS_ID from SLURM and joins jax.distributed.
#   sbatch --nodes=4 launch/slurm_gpu.sh sft --config configs/sft.py:llama3_8b \
#       --config.model.path=/models/llama3 --config.data.train=/data/sft.jsonl --workdir /shared/run1
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm_gpu.sh ...   # one per GPU
# --signal sends SIGTERM two minutes before the time limit: jaxft saves and exits 75, and this
# script requeues the job (--requeue also brings it back after a node failure or preemption);
# the requeued job resumes from the workdir, which must be on a shared filesystem.
#SBATCH --job-name=jaxft
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
set -euo pipefail
(($#)) || { echo "slurm_gpu.sh: give the jaxft command, e.g. sft --config configs/sft.py --workdir DIR" >&2; exit 2; }
: "${SLURM_JOB_ID:?run this with sbatch (or inside an salloc allocation)}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE under pipefail
head_node=${nodes[0]}
export JAXFT_COORDINATOR="${head_node}:${JAXFT_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export JAXFT_NUM_PROCESSES="${SLURM_NTASKS:-$SLURM_NNODES}"
status=0
# shellcheck disable=SC2016  # SLURM_PROCID is each task's own, expanded in the task
srun --kill-on-bad-exit=1 bash -c 'JAXFT_PROCESS_ID=$SLURM_PROCID exec jaxft "$@"' jaxft "$@" || status=$?
if ((status == 75)); then  # saved on SIGTERM: come back and resume
  echo "slurm_gpu.sh: jaxft saved and stopped (exit 75); requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
