#!/usr/bin/env bash
# One task per node, all GPUs of a node per task; JAX reads the SLURM environment in
# jax.distributed.initialize(). Submit with:
#   sbatch --nodes=4 launch/slurm_gpu.sh sft --config configs/sft.py:llama3_8b \
#       --config.model.path=/models/Meta-Llama-3-8B --config.data.train=/data/sft.jsonl --workdir /shared/run1
#SBATCH --job-name=jaxft
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --requeue
#SBATCH --signal=TERM@120
# --signal sends SIGTERM two minutes before the time limit: jaxft checkpoints and exits 75;
# --requeue restarts the job, which resumes from the workdir.
set -euo pipefail
srun --kill-on-bad-exit=1 jaxft "$@"
