"""The loop's hooks one by one, and the loop driving them, with fakes: no model, no compile.

(The real run's log, eval, save, keep-best, sample and SIGTERM paths end to end: tests/test_train_run.py
and tests/test_run_safety.py.)"""

import dataclasses
import math
import types

import pytest

from jaxft.io import checkpoint
from jaxft.loop import Hook, Hooks, Preempted, StepInfo, core, train_loop
from jaxft.loop.hooks import Evaluate, KeepBest, Preemption, Record, Sample, Save, Window


@dataclasses.dataclass
class Batch:  # what the loop and the hooks read of a `Prepared` batch
    data_state: dict
    real_tokens: int
    batch: dict = dataclasses.field(default_factory=dict)
    length: int = 8
    padding_fraction: float = 0.25
    epoch: int = 0


class Writer:
    def __init__(self):
        self.rows, self.samples = [], []

    def write(self, step, row):
        self.rows.append({"step": step, **row})

    def write_samples(self, step, samples):
        self.samples.append((step, samples))


class Checkpointer:
    """Checkpointer's surface: saves are recorded; max_to_keep=1 keeps the newest only (as the best folder)."""

    def __init__(self, directory=None, max_to_keep=None, saved=()):
        self.directory, self.max_to_keep = directory, max_to_keep
        self.saved = list(saved)  # (step, meta, force)
        self.waits = self.closes = 0

    def save(self, step, state, meta, *, force=False):
        self.saved.append((step, meta, force))
        if self.max_to_keep == 1:
            self.saved = self.saved[-1:]

    def latest_step(self):
        return self.saved[-1][0] if self.saved else None

    def restore_meta(self, step):
        return next(meta for s, meta, _ in self.saved if s == step)

    def wait(self):
        self.waits += 1

    def close(self):
        self.closes += 1


class Task:
    """Evaluates to the next of `eval_losses`; samples one row; steps count up."""

    def __init__(self, eval_losses=(), can_evaluate=True):
        self.eval_losses, self.can_evaluate = list(eval_losses), can_evaluate
        self.ctx = types.SimpleNamespace(mesh=None)

    def step(self, state, batch):
        return {"step": state["step"] + 1, "params": "p"}, {"loss": 2.0, "learning_rate": 0.1, "skipped": 0.0}

    def evaluate(self, params):
        return {"eval_loss": self.eval_losses.pop(0)}

    def sample(self, params):
        return [{"prompt": "hi", "completion": f"from {params}"}]


class Stop:
    def __init__(self, requested=False, interrupted=False):
        self.requested, self.interrupted = requested, interrupted

    def due(self, step, every):
        return self.requested

    def any_host(self):
        return self.requested

    def stopped(self, step):
        return Preempted(step)


def info(step, steps=10, **fields):
    return StepInfo(step=step, steps=steps, state={"step": step, "params": "p"}, metrics={},
                    batch=Batch({"position": step}, real_tokens=100 * step), **fields)


def config(**train):
    train = {"log_every": 0, "eval_every": 0, "sample_every": 0, "save_every": 0, "keep_best": False,
             "eval_benchmarks": "", "preemption_check_every": 1, "max_bad_steps": 3, "progress": False,
             "prefetch": 0, **train}
    return types.SimpleNamespace(train=types.SimpleNamespace(**train), to_dict=lambda: {"train": train})


def test_every_n_fires_on_its_multiples_and_at_the_end_only_when_asked():
    def fired(hook, steps=7):
        return [s for s in range(1, steps + 1) if hook.due(s, steps)]

    assert fired(Hook(every=3)) == [3, 6]
    assert fired(Hook(every=3, at_end=True)) == [3, 6, 7]
    assert fired(Hook(every=0, at_end=True)) == [7]
    assert fired(Hook(every=0)) == []


def test_row_hooks_make_one_row_written_before_the_other_hooks_run():
    events, writer = [], Writer()
    hooks = Hooks()
    hooks.add(lambda i: events.append(("act", dict(i.row))), every=2)
    hooks.add(lambda i: {"loss": 1.0}, every=2, row=True)
    hooks.add(lambda i: {"eval_loss": 3.0}, every=4, row=True)
    record = Record(writer)
    record.skipped = 2  # non-finite steps since the last row: the next row says so
    for step in (2, 4):
        hooks.run(info(step), record)
    assert writer.rows == [{"step": 2, "loss": 1.0, "skipped_steps": 2.0}, {"step": 4, "loss": 1.0, "eval_loss": 3.0}]
    assert events == [("act", {"loss": 1.0, "skipped_steps": 2.0}), ("act", {"loss": 1.0, "eval_loss": 3.0})]
    assert record.rows == writer.rows


def best_folder(tmp_path, saved=()):
    """KeepBest's Checkpointer factory: one fake best folder, opened at most once."""
    best = Checkpointer(max_to_keep=1, saved=saved)
    opened = []

    def open_checkpointer(workdir):
        assert workdir == tmp_path and not opened
        opened.append(workdir)
        return best

    return best, open_checkpointer


def test_eval_then_keep_best_keeps_the_lowest_eval_loss_replacing_the_previous(tmp_path):
    best, opener = best_folder(tmp_path)
    hooks = Hooks([Evaluate(2, Task([3.0, 2.0, 2.5, 1.0])), KeepBest(2, tmp_path, open_checkpointer=opener)])
    assert hooks.hooks[1].best == math.inf  # no best folder yet: nothing opened
    kept = []
    for step in (2, 4, 6, 8):
        hooks.run(info(step), Record(Writer()))
        kept.append(best.saved[-1][:2] if best.saved else None)
    assert kept == [(2, {"eval_loss": 3.0}), (4, {"eval_loss": 2.0}), (4, {"eval_loss": 2.0}),
                    (8, {"eval_loss": 1.0})]
    assert len(best.saved) == 1  # the previous best is replaced
    hooks.close()
    assert best.closes == 1


def test_a_resumed_keep_best_must_beat_the_best_kept_before(tmp_path):
    (tmp_path / checkpoint.BEST_SUBDIR).mkdir()
    best, opener = best_folder(tmp_path, saved=[(4, {"eval_loss": 1.5}, True)])
    keep = KeepBest(2, tmp_path, open_checkpointer=opener)
    assert keep.best == 1.5
    keep(info(6, row={"eval_loss": 2.0}))
    keep(info(7, row={"loss": 0.5}))  # no evaluation at this step: nothing to compare
    assert best.latest_step() == 4
    keep(info(8, row={"eval_loss": 1.25}))
    assert best.saved == [(8, {"eval_loss": 1.25}, True)] and keep.best == 1.25


def test_save_records_the_data_position_and_a_stop_saves_once_then_raises():
    ckpt, stop = Checkpointer(), Stop()
    save = Save(4, ckpt, config())
    preempt = Preemption(1, stop, save)
    hooks = Hooks([save, preempt])
    assert [s for s in range(1, 9) if save.due(s, 8)] == [4, 8]
    assert not preempt.due(3, 8)  # nothing requested

    stop.requested = True
    assert preempt.due(3, 8) and not preempt.due(8, 8)  # the last step finishes the run instead
    with pytest.raises(Preempted) as stopped:
        hooks.run(info(3, steps=8), Record(Writer()))
    assert stopped.value.step == 3
    assert ckpt.saved == [(3, {"data": {"position": 3}, "config": config().to_dict()}, True)]
    assert ckpt.waits == 1

    with pytest.raises(Preempted):  # a save step: Save wrote it, the stop does not save it twice
        hooks.run(info(4, steps=8), Record(Writer()))
    assert [(step, force) for step, _, force in ckpt.saved] == [(3, True), (4, False)]


def test_sample_writes_its_rows_and_leaves_its_time_out_of_the_rates():
    writer = Writer()
    record = Record(writer)
    window = Window(0, model_config=None)
    start = window.start
    sample = Sample(5, Task(), record, window)
    assert [s for s in range(1, 12) if sample.due(s, 11)] == [5, 10]
    sample(info(5))
    assert writer.samples == [(5, [{"prompt": "hi", "completion": "from p"}])]
    assert record.rows == [{"step": 5, "samples": [{"prompt": "hi", "completion": "from p"}]}]
    assert window.start > start


class Batches:
    """The Prefetcher's surface over fake batches: batch i carries data position i."""

    def __init__(self, start):
        self.position = start

    def __next__(self):
        self.position += 1
        return Batch({"position": self.position}, real_tokens=10 * self.position)

    def close(self):
        pass


def run_fake_loop(monkeypatch, steps, cfg, task, *, stop=None, hooks=(), start=0, ckpt=None):
    """train_loop over fake batches (the Prefetcher swapped for `Batches`)."""
    monkeypatch.setattr(core, "Prefetcher", lambda data, mesh, depth: Batches(start))
    writer, ckpt = Writer(), ckpt or Checkpointer()
    data = types.SimpleNamespace(real_tokens=0, batches_per_epoch=lambda: 4)
    state, rows = train_loop({"step": start, "params": "p"}, task, data, config=cfg, steps=steps, model_config=None,
                             checkpointer=ckpt, writer=writer, stop=stop or Stop(), hooks=hooks)
    return state, rows, writer, ckpt


def test_the_loop_runs_each_hook_where_due_and_always_finishes_the_last_step(monkeypatch):
    seen = []
    cfg = config(log_every=2, eval_every=3, save_every=4, sample_every=5)
    state, rows, writer, ckpt = run_fake_loop(monkeypatch, 7, cfg, Task([3.0, 2.0, 1.0]),
                                              hooks=[Hook(lambda i: seen.append(i.step), every=5)])
    assert state["step"] == 7
    assert [(r["step"], "loss" in r, r.get("eval_loss")) for r in writer.rows] == [
        (2, True, None), (3, False, 3.0), (4, True, None), (6, True, 2.0), (7, True, 1.0)]
    assert writer.rows[0]["tokens_per_sec"] > 0 and writer.rows[0]["loss"] == 2.0
    assert writer.samples == [(5, [{"prompt": "hi", "completion": "from p"}])]
    assert [(step, meta["data"]) for step, meta, _ in ckpt.saved] == [(4, {"position": 4}), (7, {"position": 7})]
    assert seen == [5]
    assert [r["step"] for r in rows] == [2, 3, 4, 5, 6, 7]  # the rows and the samples row, in order
    # Without eval data: no eval rows, and eval_every=-1 (each epoch) is not a reason to stop.
    _, _, writer, _ = run_fake_loop(monkeypatch, 5, config(eval_every=-1), Task(can_evaluate=False))
    assert [r["step"] for r in writer.rows] == [5]


def test_the_loop_stops_at_the_step_a_stop_is_requested_after_saving_it(monkeypatch):
    stop, task, ckpt = Stop(), Task(), Checkpointer()
    dispatch = task.step

    def request_at_three(state, batch):  # a SIGTERM while step 3 is dispatched
        stop.requested = state["step"] + 1 == 3
        return dispatch(state, batch)

    task.step = request_at_three
    with pytest.raises(Preempted) as stopped:
        run_fake_loop(monkeypatch, 10, config(save_every=5, log_every=5), task, stop=stop, start=1, ckpt=ckpt)
    assert stopped.value.step == 3  # not a save step, not a log step: the stop alone synced it
    assert [(step, meta["data"], force) for step, meta, force in ckpt.saved] == [(3, {"position": 3}, True)]
