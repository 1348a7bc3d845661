"""SFT end to end on the tiny preset: exact resume, SIGTERM, kill -9 mid-save, non-finite steps,
metrics, export parity, keep-best and start-up config errors.

One uninterrupted reference run (module fixture) serves the metrics, export and keep-best
tests and is the curve the interrupted runs must reproduce. Preemption and kill tests run the
CLI in child processes (tests/train_subprocess.py) so that signals hit a real `jaxft sft`.
"""

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft import cli, config as config_lib, loop, run as run_lib
from jaxft.io import checkpoint
from jaxft.io.export import export_checkpoint
from jaxft.io.metrics import MetricsWriter, plot, read_metrics
from jaxft.models import load_hf
from tests.quickstart_subset import sft_data

REPO = Path(__file__).resolve().parents[1]
SFT_CONFIG = REPO / "configs" / "sft.py"
HELPER = Path(__file__).resolve().parent / "train_subprocess.py"
STEPS = 6  # the reference run; the resume test stops it halfway

# Shrinks configs/sft.py:tiny to seconds; the same keys go to the CLI as --config.KEY=VALUE.
SMALL = {
    "train.steps": STEPS, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
    "train.log_every": 1, "train.save_every": 2, "train.eval_every": 3, "optim.warmup_steps": 2,
    "mesh.data": -1,
}
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "num_tokens", "mean_token_accuracy",
              "tokens_per_sec", "step_time")


def small_config(overrides: dict):
    """configs/sft.py:tiny shrunk by SMALL and `overrides`, loaded as the CLI loads it."""
    return config_lib.load(f"{SFT_CONFIG}:tiny", {**SMALL, **overrides})


def cli_flags(overrides: dict) -> list[str]:
    return [f"--config={SFT_CONFIG}:tiny"] + [
        f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()
    ]


def steps_logged(workdir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(workdir) if "loss" in r]


def rows_written(workdir: Path) -> int:
    """Complete lines of metrics.jsonl so far (safe while a child process appends to it)."""
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def latest_step(workdir: Path) -> int | None:
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The first lines of the bundled quickstart data: tokenising all of it costs seconds."""
    return sft_data(tmp_path_factory.mktemp("data"), 256)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> run_lib.RunResult:
    """STEPS uninterrupted steps, logged every step, eval every 3, saved every 2, keep-best on."""
    return run_lib.run(small_config({**data, "train.keep_best": True}), tmp_path_factory.mktemp("reference"))


# --- 1. Exact resume --------------------------------------------------------------------------


def test_resume_key_list_allows_more_steps():
    # Extending a finished run (`--config.train.steps=` larger) must stay possible.
    assert "train.steps" not in checkpoint.RESUME_KEYS
    assert "data.max_length" in checkpoint.RESUME_KEYS


def test_resume_continues_the_exact_loss_curve(data, reference, tmp_path, monkeypatch):
    """Stopped (SIGTERM, in process) at STEPS/2 and resumed == STEPS uninterrupted, per step."""
    config = small_config({**data, "train.keep_best": True})
    stop_at = STEPS // 2  # not a save_every step: the stop itself must save
    write = MetricsWriter.write
    handler_before = signal.getsignal(signal.SIGTERM)

    def write_then_sigterm(self, step, metrics):
        write(self, step, metrics)
        if step == stop_at and "loss" in metrics:
            # Only with jaxft's handler installed: the default one would end pytest itself.
            assert signal.getsignal(signal.SIGTERM) is not handler_before
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_sigterm)
    with pytest.raises(loop.Preempted) as stopped:
        run_lib.run(config, tmp_path)
    monkeypatch.undo()
    assert stopped.value.step == stop_at
    assert latest_step(tmp_path) == stop_at
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the run put it back

    resumed = run_lib.run(config, tmp_path)
    assert resumed.step == STEPS
    ours, ref = read_metrics(tmp_path), read_metrics(reference.workdir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    diff = {key: max(abs(a[key] - b[key]) for a, b in zip(ours, ref) if key in b)
            for key in ("loss", "grad_norm", "mean_token_accuracy", "num_tokens", "learning_rate",
                        "eval_loss")}
    print(f"resume: max abs difference per metric over {STEPS} steps: {diff}")
    assert diff["loss"] <= 1e-6, diff
    assert diff["eval_loss"] <= 1e-6, diff
    assert diff["grad_norm"] <= 1e-5 * max(r["grad_norm"] for r in ref), diff
    assert diff["num_tokens"] == diff["learning_rate"] == 0.0, diff  # same data, same schedule
    # The final weights (exported at the end of both runs) agree too.
    a, b = load_file(str(resumed.export_dir / "model.safetensors")), load_file(str(reference.export_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


# --- 2, 3. Preemption and kill -9 in a child process ------------------------------------------


@pytest.fixture(scope="module")
def jax_cache() -> Path:
    """The session's XLA compilation cache (tests/conftest.py): the child processes of both
    workers and both files compile their 2-device programs once."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def _start(workdir: Path, overrides: dict, log: Path, cache: Path, env: dict | None = None) -> subprocess.Popen:
    child_env = {**os.environ, **(env or {})}
    # Two devices start faster than eight; a compilation cache shared by the child processes
    # saves most of the compile time after the first.
    child_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    child_env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    child_env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [sys.executable, str(HELPER), "sft", *cli_flags(overrides), f"--workdir={workdir}"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=child_env)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the test could act:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _run_to_end(workdir: Path, overrides: dict, log: Path, cache: Path) -> str:
    proc = _start(workdir, overrides, log, cache)
    try:
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


@pytest.mark.subprocess
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_exits_and_the_rerun_resumes(data, jax_cache, tmp_path, caplog, signame):
    """SIGTERM (a preemption: exit 75) and SIGINT (Ctrl-C: exit 130) save at the next step
    boundary, exit without a traceback and release the workdir lock; the same command resumes.
    While the first run trains, a second run on its workdir is refused at once, naming it.
    The one signal test (issue 23): the Ctrl-C test of test_run_safety and its live-workdir lock
    test are merged here; exact resume is proven in process by
    test_resume_continues_the_exact_loss_curve, so the rerun goes in process too."""
    from jaxft.io import lock

    workdir, log = tmp_path / "run", tmp_path / "first.log"
    sig, code = getattr(signal, signame), {"SIGTERM": loop.EXIT_PREEMPTED, "SIGINT": loop.EXIT_INTERRUPTED}[signame]
    # SIGTERM: every step is a save step, so the stop lands on a step that is already being
    # saved; SIGINT: only the stop saves.
    overrides = {**data, "data.eval": "", "train.steps": 200, "train.save_every": 1 if signame == "SIGTERM" else 0}
    proc = _start(workdir, overrides, log, jax_cache)
    try:
        _wait_for(lambda: rows_written(workdir) >= 2, proc, log)
        began = time.monotonic()
        with pytest.raises(lock.WorkdirLocked) as refused:
            run_lib.run(small_config(overrides), workdir)
        assert time.monotonic() - began < 30  # refused before data, model or compilation
        message = str(refused.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and str(workdir / "run.lock") in message
        assert "\n" not in message
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == code == {"SIGTERM": 75, "SIGINT": 130}[signame], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    stopped = latest_step(workdir)
    assert stopped is not None and stopped == steps_logged(workdir)[-1] and stopped < 200
    assert (f"preempted: saved step {stopped}" if signame == "SIGTERM" else
            f"interrupted (Ctrl-C): saved step {stopped}; rerun the same command to resume") in text
    assert not (workdir / "run.lock").exists()

    # Rerunning resumes; here with two more steps so it ends quickly (train.steps may change on
    # resume), in this process (8 devices: the 2-device checkpoint is resharded).
    with caplog.at_level(logging.INFO, logger="jaxft"):
        result = run_lib.run(small_config({**overrides, "train.steps": stopped + 2}), workdir, export=False)
    assert any(f"at step {stopped}" in r.getMessage() for r in caplog.records)  # "resumed WORKDIR at step N"
    assert result.step == stopped + 2
    assert steps_logged(workdir) == list(range(1, stopped + 3))
    assert latest_step(workdir) == stopped + 2


@pytest.mark.subprocess
def test_kill_during_save_resumes_from_the_last_committed_step(data, jax_cache, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    hang = 3  # the save of this step never commits: the process is killed while it is written
    overrides = {**data, "data.eval": "", "train.steps": STEPS, "train.save_every": 1}
    proc = _start(workdir, overrides, log, jax_cache, env={"JAXFT_TEST_HANG_SAVE_AT": str(hang)})
    def hung():
        return re.search(r"HANG_SAVE (\S+)\n", log.read_text())

    _wait_for(hung, proc, log)
    tmp_dir = Path(hung().group(1))
    assert tmp_dir.is_dir() and tmp_dir.parent == workdir / "checkpoints"
    assert any(tmp_dir.glob("state*/_METADATA"))  # the arrays were written, not committed
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert not (workdir / "checkpoints" / str(hang)).exists()
    assert latest_step(workdir) == hang - 1  # the uncommitted folder is not a step

    text = _run_to_end(workdir, overrides, tmp_path / "second.log", jax_cache)
    assert f"at step {hang - 1}" in text
    assert latest_step(workdir) == STEPS
    # Rows logged past the last checkpoint before the kill are replaced by the rerun's.
    assert steps_logged(workdir) == list(range(1, STEPS + 1))


# --- 4. Non-finite steps ----------------------------------------------------------------------


def test_non_finite_steps_are_skipped_then_the_run_stops(data, tmp_path):
    # lr 1e30 after a zero-lr warmup step: steps 1 and 2 are finite (step 2 applies the huge
    # update), every later step overflows.
    config = small_config({**data, "data.eval": "", "train.steps": 20, "train.save_every": 1,
                           "train.max_bad_steps": 3, "optim.lr": 1e30, "optim.warmup_steps": 2})
    with pytest.raises(loop.NonFiniteError, match=r"train\.max_bad_steps=3.*checkpoint, step 2 in"):
        run_lib.run(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert steps_logged(tmp_path) == [r["step"] for r in rows] == [1, 2]  # skipped steps get no row
    assert latest_step(tmp_path) == 2
    # The last good checkpoint restores (the skipped steps never reached it).
    params = load_file(str(export_checkpoint(tmp_path, tmp_path.parent / f"{tmp_path.name}-hf") / "model.safetensors"))
    assert all(np.isfinite(p).all() for p in params.values())


def test_lagged_metrics_and_prefetching_leave_the_run_unchanged(data, tmp_path):
    # Read every step's metrics at once, batches made on demand; or read them one step late
    # between log steps, batches made ahead in a thread: the same run either way.
    base = {**data, "data.eval": "", "train.save_every": 0}
    eager = run_lib.run(small_config({**base, "train.log_every": 1, "train.prefetch": 0}), tmp_path / "eager")
    lagged = run_lib.run(small_config({**base, "train.log_every": 3, "train.prefetch": 2}), tmp_path / "lagged")
    per_step = {r["step"]: r["loss"] for r in eager.metrics}
    assert [r["step"] for r in lagged.metrics] == [3, 6]
    for row in lagged.metrics:  # a logged loss averages the steps since the last log
        window = [per_step[s] for s in range(row["step"] - 2, row["step"] + 1)]
        assert row["loss"] == pytest.approx(np.mean(window), rel=1e-5)
    eager_params = load_file(str(eager.export_dir / "model.safetensors"))
    lagged_params = load_file(str(lagged.export_dir / "model.safetensors"))
    for name, value in eager_params.items():
        np.testing.assert_array_equal(lagged_params[name], value, err_msg=name)


# --- 5. Metrics -------------------------------------------------------------------------------


def test_metrics_jsonl_tensorboard_and_plot(reference):
    rows = read_metrics(reference.workdir)
    assert reference.metrics == rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        missing = [k for k in TRAIN_KEYS if not isinstance(row.get(k), float)]
        assert not missing, (row, missing)
        assert 0.0 <= row["mean_token_accuracy"] <= 1.0 and row["num_tokens"] > 0
        if jax.devices()[0].platform == "cpu":
            assert "mfu" not in row  # no known peak FLOP/s for a CPU
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The warmup: step 1 trains at lr 0, step 2 at half the peak (0.5 * 3e-3).
    assert rows[0]["learning_rate"] == 0.0 and rows[1]["learning_rate"] == pytest.approx(1.5e-3)

    events = list((reference.workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    png = plot(reference.workdir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- 6. Export --------------------------------------------------------------------------------


def _logits(model, tokens):
    return np.asarray(model(tokens))


def test_export_matches_transformers_and_the_trained_weights(reference, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_checkpoint(reference.workdir, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}],
                                         tokenize=False, add_generation_prompt=True)
    tokens = np.asarray([tokenizer(text)["input_ids"]], np.int32)

    ours = _logits(load_hf(out), tokens)
    trained = _logits(load_hf(reference.export_dir), tokens)  # the run's in-memory final params
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - trained).max() <= 1e-4


def test_export_of_an_older_step_and_of_a_missing_step(reference, tmp_path):
    from flax import nnx

    from jaxft.models import abstract_model

    saved = checkpoint.Checkpointer(reference.workdir)
    assert saved.all_steps()[-2:] == [4, 6]
    older = load_hf(export_checkpoint(reference.workdir, tmp_path / "step4", step=4))
    # Compare with a full restore of step 4 (params + optimizer state), as a resume does.
    graphdef, abstract = nnx.split(abstract_model(older.cfg), nnx.Param)
    full, _ = saved.restore(4, _abstract_train_state(reference, nnx.to_pure_dict(abstract)))
    saved.close()
    # The scanned layers restore as one stack: [num_layers, ...] per param.
    assert full["params"]["layers"]["mlp"]["up_proj"].shape[0] == older.cfg.num_layers
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    want = _logits(nnx.merge(graphdef, full["params"]), tokens)
    assert np.abs(_logits(older, tokens) - want).max() <= 1e-5
    latest = load_hf(reference.export_dir)
    assert np.abs(_logits(latest, tokens) - want).max() > 1e-3  # step 4 is not step 6

    with pytest.raises(ValueError, match=r"--step 99 is not a saved step.*\[.*4, 6\]"):
        export_checkpoint(reference.workdir, tmp_path / "missing", step=99)
    assert not (tmp_path / "missing").exists()


def _abstract_train_state(reference, abstract_params):
    from jaxft.config import from_json
    from jaxft.steps.optimizer import optimizer_from_config
    from jaxft.steps.state import init_train_state

    config = from_json((reference.workdir / "config.json").read_text())
    tx, _ = optimizer_from_config(config.optim, config.train.steps)
    return jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)


# --- 7. Config errors at start-up -------------------------------------------------------------


def test_misspelt_command_line_key_fails_naming_it(tmp_path):
    with pytest.raises(SystemExit) as err:
        cli.main(["sft", f"--config={SFT_CONFIG}:tiny", "--config.optim.lrr=1", f"--workdir={tmp_path / 'w'}"])
    assert "lrr" in str(err.value.code)
    assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_the_mesh_fails_before_touching_the_workdir(data, tmp_path):
    config = small_config({**data, "train.batch_size": jax.device_count() + 4})
    with pytest.raises(ValueError, match=r"train\.batch_size.*mesh\.data \* mesh\.fsdp"):
        run_lib.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_resuming_with_a_changed_max_length_fails_naming_it(data, reference, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference.workdir, workdir)
    config = small_config({**data, "train.keep_best": True, "data.max_length": 32})
    with pytest.raises(ValueError, match=r"data\.max_length: checkpoint 64 -> now 32"):
        run_lib.run(config, workdir)
    assert (workdir / "config.json").read_text() == (reference.workdir / "config.json").read_text()


# --- 8. Keep best -----------------------------------------------------------------------------


def test_keep_best_holds_the_lowest_eval_loss(reference):
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(reference.workdir) if "eval_loss" in r}
    best = checkpoint.Checkpointer(reference.workdir, subdir="checkpoints_best")
    try:
        assert best.all_steps() == [min(evals, key=evals.get)]
        assert best.restore_meta()["eval_loss"] == pytest.approx(min(evals.values()))
    finally:
        best.close()
    # What a resumed run has to beat (else a worse eval after a restart would replace it).
    assert checkpoint.best_eval_loss(reference.workdir) == pytest.approx(min(evals.values()))


def test_epochs_count_batches_of_packed_rows():
    """train.epochs = 2 means two passes over the data, whatever packing does to the rows."""
    from jaxft.data.from_config import load_tokenizer, train_data
    from jaxft.run import total_steps

    config = config_lib.load(f"{SFT_CONFIG}:tiny", {"train.epochs": 2.0})
    iterator = train_data(config, load_tokenizer(config), kind="sft")
    steps = total_steps(config, iterator)
    seen = set()
    for _ in range(steps // 2):
        batch = next(iterator)
        seen.update(int(i) for i in batch.example_index.ravel() if i >= 0)
    assert iterator.num_examples == 4000 and len(seen) == 4000  # one epoch = half the steps
