#!/usr/bin/env bash
# N local processes joined by jax.distributed, each with its own CPU devices: the same code
# path as a multi-host pod, on one machine.
#   launch/local_multiprocess.sh 2 sft --config configs/sft.py:tiny --workdir /tmp/mp
set -euo pipefail
n=${1:?number of processes}; shift
port=${JAXFT_PORT:-$((20000 + RANDOM % 20000))}
devices_per_process=${DEVICES_PER_PROCESS:-2}
pids=()
for ((i = 0; i < n; i++)); do
  JAXFT_COORDINATOR="127.0.0.1:${port}" JAXFT_NUM_PROCESSES="$n" JAXFT_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices_per_process}" \
    jaxft "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
