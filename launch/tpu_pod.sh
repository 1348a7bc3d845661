#!/usr/bin/env bash
# Runs one jaxft command on every worker of a Cloud TPU slice, end to end:
#   1. creates the slice as a queued resource (or reuses it: same name, already ACTIVE),
#   2. copies the committed state of this checkout to every worker and installs it with jax[tpu],
#   3. runs `jaxft ARGS...` on --worker=all, streaming worker 0's log (each worker keeps its own
#      in ~/jaxft.log),
#   4. on preemption (jaxft exits 75 after saving, or the slice is gone), deletes and re-creates
#      the slice and reruns the same command: the run resumes from its workdir, which must be on
#      a bucket or disk every worker sees (gs://..., a Filestore mount).
#
#   launch/tpu_pod.sh --name my-v5p --zone us-east5-a --accelerator v5p-64 --spot -- \
#       sft --config configs/sft.py:llama3_8b --config.model.path=/mnt/models/llama3 \
#       --config.data.train=/mnt/data/sft.jsonl --workdir /mnt/runs/run1
#
# Options: --name NAME, --zone ZONE, --accelerator TYPE (v5p-64, v5litepod-16, v6e-256, ...),
# --version RUNTIME (default: the accelerator's current TPU VM image), --project PROJECT,
# --spot | --reserved, --max-restarts N (default 10), --dry-run (print every gcloud command,
# run none: the slice is taken not to exist yet). JAX finds the slice's workers itself
# (jax.distributed.initialize() with no arguments), so the command needs nothing else.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

name="" zone="" accelerator="" version="" project="" capacity="" max_restarts=10 dry_run=0
while (($#)); do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) capacity=--spot; shift ;;
    --reserved) capacity=--reserved; shift ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (the jaxft command goes after --)" >&2; usage ;;
  esac
done
(($#)) || { echo "tpu_pod.sh: no jaxft command after --" >&2; usage; }
for required in name zone accelerator; do
  [[ -n ${!required} ]] || { echo "tpu_pod.sh: --$required is required" >&2; usage; }
done
if [[ -z $version ]]; then
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
queued="${name}-qr"
scope=(--zone "$zone")
[[ -n $project ]] && scope+=(--project "$project")

# Prints the command (as a shell would read it back); runs it unless --dry-run.
run() {
  local shown=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then shown+=("$arg"); else shown+=("${arg@Q}"); fi
  done
  printf '+ %s\n' "${shown[*]}"
  ((dry_run)) || "$@"
}

# Sets `state`: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ... or NONE (no such request).
slice_state() {
  local describe=(gcloud compute tpus queued-resources describe "$queued" "${scope[@]}" --format='value(state.state)')
  if ((dry_run)); then
    run "${describe[@]}"
    state=NONE
    return
  fi
  state=$("${describe[@]}" 2>/dev/null) || state=NONE
  [[ -n $state ]] || state=NONE
}

create_slice() {
  local create=(gcloud compute tpus queued-resources create "$queued" --node-id "$name" "${scope[@]}"
    --accelerator-type "$accelerator" --runtime-version "$version")
  [[ -n $capacity ]] && create+=("$capacity")
  run "${create[@]}"
  ((dry_run)) && return
  while slice_state && [[ $state != ACTIVE ]]; do
    case "$state" in FAILED | SUSPENDED) echo "tpu_pod.sh: $queued is $state" >&2; return 1 ;; esac
    echo "tpu_pod.sh: waiting for $queued ($state)" >&2
    sleep 30
  done
}

delete_slice() {
  run gcloud compute tpus queued-resources delete "$queued" "${scope[@]}" --force --quiet
}

install() {
  local here archive
  here=$(cd "$(dirname "$0")/.." && pwd)
  archive=$(mktemp -d)/jaxft.tar.gz
  run git -C "$here" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$name":jaxft.tar.gz "${scope[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all --command \
    "rm -rf ~/jaxft && mkdir -p ~/jaxft && tar xzf ~/jaxft.tar.gz -C ~/jaxft && pip install -q -e ~/jaxft 'jax[tpu]'"
}

# Every worker runs the command and records its exit status in ~/jaxft.exit; worker 0 streams
# its log here, the others only keep theirs in ~/jaxft.log.
remote_command() {
  local jaxft_cmd
  jaxft_cmd="jaxft$(printf ' %q' "$@")"
  # shellcheck disable=SC2016  # expanded by the workers' shell, not here
  local worker='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
  printf '%s' "cd ~/jaxft && rm -f ~/jaxft.exit && if [ \"$worker\" = 0 ]; then $jaxft_cmd 2>&1 | tee ~/jaxft.log; " \
    "code=\${PIPESTATUS[0]}; else $jaxft_cmd > ~/jaxft.log 2>&1; code=\$?; fi; echo \$code > ~/jaxft.exit; exit \$code"
}

# Worker 0's jaxft exit status after a failed run ("lost" when the workers cannot be reached).
worker0_exit() {
  gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=0 --command 'cat ~/jaxft.exit' 2>/dev/null \
    || echo lost
}

slice_state
if [[ $state == ACTIVE ]]; then
  echo "tpu_pod.sh: reusing $queued ($accelerator)" >&2
else
  [[ $state == NONE ]] || delete_slice  # a failed or suspended request from before
  create_slice
fi
install
for ((attempt = 0; ; attempt++)); do
  status=0
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all --command "$(remote_command "$@")" \
    || status=$?
  ((dry_run)) && exit 0
  ((status == 0)) && { echo "tpu_pod.sh: done" >&2; exit 0; }
  code=$(worker0_exit)
  slice_state
  # 75: jaxft saved on SIGTERM (preemption, maintenance); lost: the workers went away.
  if [[ $code != 75 && $code != lost && $state == ACTIVE ]]; then
    echo "tpu_pod.sh: jaxft failed (exit $code) on a healthy slice: not retrying; see ~/jaxft.log" >&2
    exit "$status"
  fi
  if ((attempt >= max_restarts)); then
    echo "tpu_pod.sh: gave up after $max_restarts restarts (jaxft exit $code, slice $state)" >&2
    exit "$status"
  fi
  echo "tpu_pod.sh: preempted (jaxft exit $code, slice $state): re-creating the slice and resuming" >&2
  if [[ $state != ACTIVE ]]; then
    [[ $state == NONE ]] || delete_slice
    create_slice
    install
  fi
done
