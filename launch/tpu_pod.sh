#!/usr/bin/env bash
# Runs the same jaxft command on every worker of a Cloud TPU pod slice. JAX discovers the
# slice itself (jax.distributed.initialize() with no arguments), so nothing else is needed.
# The committed state of this checkout is copied to every worker and installed there.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh sft --config configs/sft.py:llama3_8b \
#       --config.model.path=/mnt/models/Meta-Llama-3-8B --config.data.train=/mnt/data/sft.jsonl \
#       --workdir /mnt/runs/run1
# The model, data and workdir must be visible to every worker (a shared disk or bucket mount).
# Preemption: workers get SIGTERM; jaxft saves at the next step and exits 75. Rerun to resume.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
here=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -d)/jaxft.tar.gz
git -C "$here" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU":jaxft.tar.gz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "mkdir -p ~/jaxft && tar xzf ~/jaxft.tar.gz -C ~/jaxft && cd ~/jaxft && \
   pip install -q -e . 'jax[tpu]' && jaxft $(printf '%q ' "$@")"
