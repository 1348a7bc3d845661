"""The loop's periodic work as hooks: log, evaluate, score benchmarks, sample, save, keep the best,
stop on a signal.

A hook is a function of the step (`StepInfo`) with a schedule: every N steps and/or at the
run's last step (Levanter's `trainer.add_hook(fn, every=N)`). `Hooks` runs the due ones in
the order added, in two phases:

1. *row* hooks (`row=True`) return metrics; together they make the step's one row of
   metrics.jsonl (train metrics from `LogMetrics`, eval metrics from `Evaluate` and
   `Benchmarks`), written once;
2. the other hooks act (`Sample`, `Save`, `KeepBest`, `Preemption`), seeing the written row
   in `info.row`.

The loop waits on the device only at a step where some hook is due (`Hooks.due`), so a hook's
schedule is also where the run syncs. A hook's `due` is asked again just before it runs: a
SIGTERM that arrives while an earlier hook works (an evaluation, a write) stops the run at
this step, not the next.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxft.io import checkpoint
from jaxft.io.metrics import device_peak_flops, train_flops_per_token


@dataclasses.dataclass
class StepInfo:
    """One finished step, as the hooks see it (the loop waited for it: the state is exact)."""
    step: int  # optimizer steps applied: the state's step
    steps: int  # the run's length in optimizer steps
    state: dict  # the train state after `step`
    metrics: dict  # the step's own metrics (device arrays)
    batch: Any  # the step's `Prepared` batch; its data_state is what a checkpoint records
    row: dict = dataclasses.field(default_factory=dict)  # the step's metrics row (after the row hooks)
    saved: bool = False  # a checkpoint of this step was written (a stop need not save it again)

    @property
    def last(self) -> bool:
        return self.step == self.steps


class Hook:
    """Runs `fn(info)` at steps that are multiples of `every` (0: never by count) and, with
    `at_end`, at the run's last step. With `row=True`, `fn` returns a dict of metrics for the
    step's row. Subclasses override `__call__` (and `due` for another schedule, `observe` to
    see every applied step's metrics, `close` to release what they hold)."""

    def __init__(self, fn: Callable[[StepInfo], Any] | None = None, every: int = 0, *, at_end: bool = False,
                 row: bool = False):
        self.fn, self.every, self.at_end, self.row = fn, every, at_end, row

    def due(self, step: int, steps: int) -> bool:
        return (bool(self.every) and step % self.every == 0) or (self.at_end and step == steps)

    def observe(self, metrics: dict) -> None:
        """Each applied step's metrics (device arrays: do not read them, that waits)."""

    def __call__(self, info: StepInfo):
        return self.fn(info)

    def close(self) -> None:
        pass


class Hooks:
    """The run's hooks, in the order added (`add(fn, every=N)`)."""

    def __init__(self, hooks=()):
        self.hooks: list[Hook] = list(hooks)

    def add(self, fn, every: int = 0, *, at_end: bool = False, row: bool = False) -> Hook:
        """Adds a `Hook`, or wraps a function `fn(info)` as one; returns it."""
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, at_end=at_end, row=row)
        self.hooks.append(hook)
        return hook

    def due(self, step: int, steps: int) -> bool:
        return any(h.due(step, steps) for h in self.hooks)

    def observe(self, metrics: dict) -> None:
        for hook in self.hooks:
            hook.observe(metrics)

    def run(self, info: StepInfo, record: Record) -> None:
        """The due row hooks, then the row written (if any), then the other due hooks."""
        for hook in self.hooks:
            if hook.row and hook.due(info.step, info.steps):
                info.row.update(hook(info))
        if info.row:
            record.write(info.step, info.row)
        for hook in self.hooks:
            if not hook.row and hook.due(info.step, info.steps):
                hook(info)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()


class Record:
    """What the run logs: rows and samples go to the `MetricsWriter` and are kept in `rows`
    (`train_loop` returns them). `skipped` counts non-finite steps since the last row: the next
    row carries them as `skipped_steps` (skipped steps get no row of their own)."""

    def __init__(self, writer):
        self.writer, self.rows, self.skipped = writer, [], 0

    def write(self, step: int, row: dict) -> None:
        if self.skipped:
            row["skipped_steps"] = float(self.skipped)
            self.skipped = 0
        self.writer.write(step, row)
        self.rows.append({"step": step, **row})

    def write_samples(self, step: int, samples: list[dict]) -> None:
        self.writer.write_samples(step, samples)
        self.rows.append({"step": step, "samples": samples})


class Window:
    """The metrics of the steps since the last log: summed on the device (no wait per step),
    averaged and rated when a row is logged."""

    def __init__(self, real_tokens: int, model_config):
        self.model_config, self.peak = model_config, device_peak_flops()
        self._reset(real_tokens)

    def _reset(self, real_tokens: int):
        self.sums, self.steps = None, 0
        self.start, self.tokens_at_start = time.perf_counter(), real_tokens

    def exclude(self, seconds: float):
        """Leaves `seconds` of host work (sample generation) out of the rates."""
        self.start += seconds

    def add(self, metrics: dict):
        self.sums = metrics if self.sums is None else jax.tree.map(lambda a, b: a + b, self.sums, metrics)
        self.steps += 1

    def row(self, last, metrics: dict) -> dict:
        """The logged row after `last` (a Prepared batch) and its step's `metrics`; restarts."""
        elapsed = time.perf_counter() - self.start
        # Averages over the steps since the last log (as TRL does); the rate is the current one.
        row = {k: float(v) / self.steps for k, v in jax.device_get(self.sums).items() if k != "skipped"}
        row["learning_rate"] = float(metrics["learning_rate"])
        # A step that builds its own batch (online DPO samples it) reports its real tokens and
        # padding; the others' come from the data iterator.
        tokens = row.pop("real_tokens") * self.steps if "real_tokens" in row else last.real_tokens - self.tokens_at_start
        row["tokens_per_sec"] = tokens / elapsed
        row["step_time"] = elapsed / self.steps
        row.setdefault("padding_fraction", last.padding_fraction)
        row["epoch"] = float(last.epoch)
        if self.peak:
            flops = train_flops_per_token(self.model_config, last.length) * row["tokens_per_sec"]
            row["mfu"] = flops / (self.peak * jax.device_count())
        self._reset(last.real_tokens)
        return row


class LogMetrics(Hook):
    """train.log_every and the last step: the train metrics averaged since the last row."""

    def __init__(self, every: int, window: Window):
        super().__init__(every=every, at_end=True, row=True)
        self.window = window

    def observe(self, metrics):
        self.window.add(metrics)

    def __call__(self, info):
        return self.window.row(info.batch, info.metrics)


class Evaluate(Hook):
    """train.eval_every and the last step: the task's held-out metrics (`eval_loss`, ...)."""

    def __init__(self, every: int, task):
        super().__init__(every=every, at_end=True, row=True)
        self.task = task

    def __call__(self, info):
        return self.task.evaluate(info.state["params"])


class Benchmarks(Hook):
    """train.eval_benchmarks, on the schedule of `Evaluate` (train.eval_every and the last step):
    each benchmark's greedy pass@1 and its other numbers as eval/NAME/METRIC in the step's row.
    Its data is read when the hook is made (a bad record fails before training); its time is
    left out of the step-time rates, as sampling's is."""

    def __init__(self, every: int, task, window: Window | None = None):
        super().__init__(every=every, at_end=True, row=True)
        self.task, self.window = task, window
        task.prepare_benchmarks()

    def __call__(self, info):
        began = time.perf_counter()
        row = self.task.benchmarks(info.state["params"], info.step)
        if self.window is not None:
            self.window.exclude(time.perf_counter() - began)
        return row


class Sample(Hook):
    """train.sample_every: greedy completions of the eval prompts, one samples row. It reads the
    params only (training is unchanged), and its time is left out of the step-time rates."""

    def __init__(self, every: int, task, record: Record, window: Window | None = None):
        super().__init__(every=every)
        self.task, self.record, self.window = task, record, window

    def __call__(self, info):
        began = time.perf_counter()
        self.record.write_samples(info.step, self.task.sample(info.state["params"]))
        if self.window is not None:
            self.window.exclude(time.perf_counter() - began)  # generation is not step time


class Save(Hook):
    """train.save_every and the last step: the state with the data position that produced it."""

    def __init__(self, every: int, checkpointer, config):
        super().__init__(every=every, at_end=True)
        self.checkpointer, self.config = checkpointer, config

    def __call__(self, info):
        self.save(info)

    def save(self, info: StepInfo, *, force: bool = False) -> None:
        meta = {"data": info.batch.data_state, "config": self.config.to_dict()}
        self.checkpointer.save(info.step, info.state, meta, force=force)
        info.saved = True


class KeepBest(Hook):
    """train.keep_best: after an evaluation (same schedule as `Evaluate`), keeps the state as
    WORKDIR/checkpoints_best when its eval_loss is the lowest yet, replacing the one before.
    A resumed run must beat the best kept before it stopped: `best` starts as that one's
    eval_loss (inf when there is none), so a worse eval after a restart replaces nothing."""

    def __init__(self, every: int, workdir: Path, *, open_checkpointer: Callable | None = None):
        """`open_checkpointer(workdir)`: the best folder's Checkpointer (tests pass a fake)."""
        super().__init__(every=every, at_end=True)
        self.workdir = Path(workdir)
        self._open = open_checkpointer or functools.partial(
            checkpoint.Checkpointer, max_to_keep=1, subdir=checkpoint.BEST_SUBDIR, async_save=False)
        self._best_ckpt = None  # opened when there is a best to read or to write
        self.best = self._previous_best()

    def _previous_best(self) -> float:
        if not (self.workdir / checkpoint.BEST_SUBDIR).is_dir():
            return math.inf
        self._best_ckpt = self._open(self.workdir)
        step = self._best_ckpt.latest_step()
        return math.inf if step is None else float(self._best_ckpt.restore_meta(step)["eval_loss"])

    def __call__(self, info):
        loss = info.row.get("eval_loss")
        if loss is None or not loss < self.best:  # no evaluation at this step, or no better
            return
        self.best = loss
        if self._best_ckpt is None:
            self._best_ckpt = self._open(self.workdir)
        self._best_ckpt.save(info.step, info.state, {"eval_loss": loss}, force=True)

    def close(self):
        if self._best_ckpt is not None:
            self._best_ckpt.close()
            self._best_ckpt = None


class Preemption(Hook):
    """SIGTERM / Ctrl-C (`StopFlag`): saves the step (unless `Save` just did: Orbax refuses a
    second save of a step), waits for the write and raises `Preempted` / `Interrupted`. Checked
    at once on one host, every `every` steps (train.preemption_check_every) with several. Not
    at the last step: a complete run finishes (exports) rather than stops."""

    def __init__(self, every: int, stop, save: Save):
        super().__init__(every=every)
        self.stop, self.save = stop, save

    def due(self, step, steps):
        return step < steps and self.stop.due(step, self.every)

    def __call__(self, info):
        if not self.stop.any_host():
            return
        if not info.saved:
            self.save.save(info, force=True)
        self.save.checkpointer.wait()
        raise self.stop.stopped(info.step)


def default_hooks(task, data, *, config, model_config, checkpointer, record: Record, stop) -> Hooks:
    """A run's hooks from its config: log, eval (with eval data), sample, save, keep-best, stop."""
    train = config.train
    window = Window(data.real_tokens, model_config)
    hooks = Hooks([LogMetrics(train.log_every, window)])
    # -1: at the end of every epoch (TRL's eval_strategy="epoch"), counted in batches.
    eval_every = data.batches_per_epoch() if train.eval_every == -1 else train.eval_every
    if task.can_evaluate:
        hooks.add(Evaluate(eval_every, task))
    if train.eval_benchmarks:
        hooks.add(Benchmarks(eval_every, task, window))
    if train.sample_every:
        hooks.add(Sample(train.sample_every, task, record, window))
    save = hooks.add(Save(train.save_every, checkpointer, config))
    if train.keep_best and task.can_evaluate:
        hooks.add(KeepBest(eval_every, checkpointer.directory.parent))
    hooks.add(Preemption(train.preemption_check_every, stop, save))
    return hooks
