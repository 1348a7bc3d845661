"""Two local processes joined by jax.distributed train exactly like one process.

Each process feeds only its half of every global batch; params, optimizer state and
checkpoints are sharded over the 4 devices of both processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind, workdir):
    extra = {
        "sft": [],
        # DPO: pairs of both hosts are gathered; the precomputed reference table too.
        "dpo": ["--config.dpo.precompute_reference=True", "--config.dpo.loss_type=sigmoid",
                "--config.dpo.loss_weights=", "--config.data.eval="],
    }[kind]
    return [
        sys.executable, "-m", "jaxft.cli", kind, "--config", f"configs/{kind}.py:tiny", f"--workdir={workdir}", *extra,
        f"--config.train.steps={STEPS}", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.progress=False", "--config.data.max_length=64", "--config.train.save_every=3",
        "--config.train.eval_every=0", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.mesh.data=2", "--config.mesh.fsdp=2",
    ]


def env_for(devices, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_match_one(tmp_path, kind):
    one = subprocess.Popen(command(kind, tmp_path / "one"), cwd=REPO, env=env_for(4),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = free_port()
    procs = [
        subprocess.Popen(command(kind, tmp_path / "two"), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=env_for(2, JAXFT_COORDINATOR=f"127.0.0.1:{port}", JAXFT_NUM_PROCESSES="2",
                                     JAXFT_PROCESS_ID=str(i)))
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in [one, *procs]]
    for p, out in zip([one, *procs], outputs):
        assert p.returncode == 0, out[-3000:]
    single, multi = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(multi) == STEPS
    assert single == pytest.approx(multi, abs=1e-5)
    # Both processes wrote one checkpoint together and process 0 the export.
    assert (tmp_path / "two" / "checkpoints" / str(STEPS)).is_dir()
    assert (tmp_path / "two" / "hf" / "model.safetensors").is_file()
