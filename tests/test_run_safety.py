"""Nothing a user or a flaky machine does loses work or ends in a traceback: one run per
workdir (the lock), damaged checkpoints and reference caches, Ctrl-C, and honest non-finite
messages and metrics.

Runs are the tiny SFT preset of tests/test_train_run.py; the signal tests run the CLI in a
child process (tests/train_subprocess.py).
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import loop, run as run_lib
from jaxft.io import checkpoint, lock
from jaxft.io.metrics import read_metrics
from jaxft.tasks import dpo_reference
from jaxft.tasks.sft import SFT
from tests.quickstart_subset import sft_data
from tests.test_train_run import _start, _wait_for, latest_step, small_config

# Four steps saved at 2 and 4: the corruption tests damage step 4 of a copy.
BASE = {"data.eval": "", "train.steps": 4, "train.save_every": 2, "train.max_to_keep": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return sft_data(tmp_path_factory.mktemp("data"), 256)


@pytest.fixture(scope="module")
def jax_cache() -> Path:
    """The session's XLA compilation cache (tests/conftest.py): the child processes of both
    workers and both files compile their 2-device programs once."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> run_lib.RunResult:
    """BASE run to the end, uninterrupted: checkpoints 2 and 4, the curve resumed runs redo."""
    return run_lib.run(small_config({**data, **BASE}), tmp_path_factory.mktemp("finished"), export=False)


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it (until the kernel reuses it, long after)


# --- 1. One run per workdir -------------------------------------------------------------------


# A second run on a live workdir is refused naming the first: proven in test_train_run's
# test_a_signal_saves_exits_and_the_rerun_resumes (while its child process trains).


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(data, tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    pid = dead_pid()
    (workdir / "run.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00", "pid_start": None}))
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        result = run_lib.run(small_config({**data, **BASE, "train.steps": 2}), workdir, export=False)
    assert result.step == 2
    assert any("stale lock" in r.getMessage() and f"pid {pid}" in r.getMessage() for r in caplog.records)
    assert not (workdir / "run.lock").exists()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-7", "pid": os.getpid(), "started": "2026-01-01T00:00:00"}))
    with pytest.raises(lock.WorkdirLocked, match=r"pid \d+ on node-7.*if node-7 no longer trains it, remove"):
        lock.acquire(tmp_path)
    assert json.loads(path.read_text())["host"] == "node-7"  # left alone


def test_a_reused_pid_is_stale_and_a_lock_is_released_on_an_exception(tmp_path):
    # This process is alive, but a lock record with another start time was another process's.
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "then",
                                "pid_start": "-1"}))
    with pytest.raises(KeyError), lock.acquire(tmp_path):
        assert json.loads(path.read_text())["pid_start"] != "-1"  # ours now
        raise KeyError("the run failed")
    assert not path.exists()
    only_process_0 = lock.acquire(tmp_path, process_index=1)
    assert not path.exists()
    only_process_0.release()


# --- 2. Damaged checkpoints and caches --------------------------------------------------------


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(path: Path, keep: int | None = None) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 if keep is None else keep])


def _empty(step_dir: Path) -> None:
    for p in step_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# Orbax 0.12's step: STEP/state/{_METADATA, manifest.ocdbt, ocdbt.process_0/d/<arrays>}, STEP/meta/metadata.
CORRUPTIONS = {
    "truncated-array-file": lambda step: _truncate(_largest_array_file(step)),
    "missing-array-file": lambda step: _largest_array_file(step).unlink(),
    "truncated-state-metadata": lambda step: _truncate(step / "state" / "_METADATA", 100),
    "truncated-meta": lambda step: _truncate(step / "meta" / "metadata", 10),
    "emptied-step-folder": _empty,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(data, finished, tmp_path, caplog, corrupt):
    workdir = tmp_path / "run"
    shutil.copytree(finished.workdir, workdir)
    corrupt(workdir / "checkpoints" / "4")
    more = {**data, **BASE, "train.steps": 6}  # resumed from 2, it redoes 3 and 4, then goes on
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        result = run_lib.run(small_config(more), workdir, export=False)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 4" in w and "does not restore" in w for w in warnings), warnings
    assert result.step == 6
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 7))
    # The redone steps are the same steps (same data position, same state) as the first time.
    redone, first = losses(workdir), losses(finished.workdir)
    assert max(abs(redone[s] - first[s]) for s in (3, 4)) <= 1e-6
    # The damaged step is kept aside, not deleted; Orbax saved the new 4 and 6 and kept 2 (max_to_keep).
    assert (workdir / "checkpoints_unrestorable" / "4").is_dir()
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2)
    try:
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.restore_meta(4)["data"]  # the new step 4 reads back
    finally:
        ckpt.close()


def test_when_no_checkpoint_restores_the_error_lists_each_step_and_nothing_moves(data, finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished.workdir, workdir)
    for step in (2, 4):
        _empty(workdir / "checkpoints" / str(step))
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*checkpoints restores \(step 4: .*; step 2: .*\)"):
        run_lib.run(small_config({**data, **BASE}), workdir, export=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert not (workdir / "checkpoints_unrestorable").exists()
    assert not (workdir / "run.lock").exists()


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:40], lambda b: b""],
                         ids=["half", "header", "empty"])
def test_a_truncated_reference_cache_is_recomputed(tmp_path, caplog, damage):
    key = {"data": "pairs.jsonl", "fingerprint": "abc"}
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    assert dpo_reference.cached_table(tmp_path, key, lambda: table) is table
    (path,) = (tmp_path / dpo_reference.CACHE_SUBDIR).glob("*.npy")
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        again = dpo_reference.cached_table(tmp_path, key, lambda: table + 0)
    np.testing.assert_array_equal(again, table)
    assert any("do not read back" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.load(path), table)  # replaced by a whole one
    assert dpo_reference.cached_table(tmp_path, key, lambda: pytest.fail("recomputed a good table")).shape == (10, 2)


# --- 3. Ctrl-C --------------------------------------------------------------------------------


# Ctrl-C saves, exits 130 and the rerun resumes: test_train_run's
# test_a_signal_saves_exits_and_the_rerun_resumes[SIGINT].


@pytest.mark.subprocess
def test_a_second_ctrl_c_stops_at_once_without_saving_or_a_traceback(data, jax_cache, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    # The save of step 2 never commits (the hang), so the first Ctrl-C's save cannot finish.
    overrides = {**data, "data.eval": "", "train.steps": 200, "train.save_every": 1}
    proc = _start(workdir, overrides, log, jax_cache, env={"JAXFT_TEST_HANG_SAVE_AT": "2"})
    _wait_for(lambda: "HANG_SAVE" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: "saving at the next step boundary" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == loop.EXIT_INTERRUPTED, text[-3000:]
    assert "Traceback" not in text and "stopped without saving" in text, text[-3000:]
    assert latest_step(workdir) == 1  # the last committed step is still the latest
    assert not (workdir / "run.lock").exists()


# --- 4. Honest messages and metrics -----------------------------------------------------------


def test_non_finite_stop_before_any_checkpoint_says_there_is_none(data, tmp_path):
    # lr 1e30 after a zero-lr warmup step: step 2 applies a huge update, every later one overflows.
    config = small_config({**data, "data.eval": "", "train.steps": 20, "train.save_every": 0,
                           "train.max_bad_steps": 2, "optim.lr": 1e30, "optim.warmup_steps": 2})
    with pytest.raises(loop.NonFiniteError) as err:
        run_lib.run(config, tmp_path)
    message = str(err.value)
    assert "No checkpoint was saved yet" in message and "is intact" not in message
    assert not (tmp_path / "run.lock").exists()  # released on the error too


def test_skipped_steps_are_counted_in_the_next_row_and_reuse_no_step(data, tmp_path, monkeypatch):
    # The loop sees only the step's `skipped` flag: report the third update as skipped.
    original, calls = SFT.step, []

    def third_skipped(self, state, batch):
        state, metrics = original(self, state, batch)
        calls.append(1)
        return state, ({**metrics, "skipped": jnp.ones(())} if len(calls) == 3 else metrics)

    monkeypatch.setattr(SFT, "step", third_skipped)
    run_lib.run(small_config({**data, **BASE}), tmp_path, export=False)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 5 updates tried, 4 steps, one row each
    assert {r["step"]: r["skipped_steps"] for r in rows if "skipped_steps" in r} == {3: 1.0}


def test_a_changed_learning_rate_on_resume_is_logged_with_old_and_new(tmp_path, caplog):
    saved = small_config({}).to_dict()
    now = small_config({"optim.lr": 1e-4, "optim.schedule": "linear"}).to_dict()
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        checkpoint.check_resumable(saved, now, tmp_path)
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert f"optim.lr: checkpoint {saved['optim']['lr']!r} -> now 0.0001" in warnings
    assert "optim.schedule: checkpoint 'cosine' -> now 'linear'" in warnings
    assert "train.batch_size" not in warnings and str(tmp_path) in warnings


def _two_steps(workdir):
    """A Checkpointer over `workdir` with steps 1 and 2 of a small state; (checkpointer, abstract)."""
    import jax

    state = {"w": jax.numpy.arange(4096, dtype=jax.numpy.float32), "b": jax.numpy.ones(3)}
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, state, {"data": {"step": step}})
    ckpt.wait()
    return ckpt, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_only_named_damage_moves_a_step_aside_and_a_storage_error_moves_nothing(tmp_path, monkeypatch):
    import errno

    for name, corrupt in CORRUPTIONS.items():  # each way a step breaks is damage: fall back, move aside
        ckpt, abstract = _two_steps(tmp_path / name)
        corrupt(tmp_path / name / "checkpoints" / "2")
        try:
            _, meta, step = ckpt.restore_newest_good(abstract)
        finally:
            ckpt.close()
        assert (step, meta["data"]["step"]) == (1, 1), name
        assert (tmp_path / name / checkpoint.UNRESTORABLE_SUBDIR / "2").is_dir(), name
    # A storage outage or a bug is not damage: raised with its traceback, no step moved.
    for err in (OSError(errno.EIO, "Input/output error"), TimeoutError("read timed out"),
                ValueError("UNAVAILABLE: Error reading ... connection reset"), TypeError("a bug")):
        workdir = tmp_path / f"transient-{type(err).__name__}"
        ckpt, abstract = _two_steps(workdir)
        monkeypatch.setattr(ckpt, "restore", lambda step, abstract, err=err: (_ for _ in ()).throw(err))
        try:
            with pytest.raises(type(err), match=str(err)[:10]):
                ckpt.restore_newest_good(abstract)
        finally:
            ckpt.close()
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
        assert not (workdir / checkpoint.UNRESTORABLE_SUBDIR).exists()
