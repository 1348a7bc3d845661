"""The step loop and its periodic actions: log, evaluate, sample, save, keep the best, stop on SIGTERM.

The loop knows no training method and no batch layout: batches come ready-made and global
from a background thread (`jaxft.parallel.prefetch`), and `task.step` does the rest.

It never waits on the device between ordinary steps: step t+1 is dispatched before step t's
`skipped` flag (the non-finite guard) is read, so the device always has work queued. It waits
only at steps with an action (log, eval, sample, save, the end, a preemption check), where the state
must be exact; skipped steps are found one step late, and `train.max_bad_steps` of them in a
row stop the run within one step.

Preemption: SIGTERM makes the loop save at the next step boundary, wait for the write, and
raise `Preempted` (the CLI exits with EXIT_PREEMPTED = 75, "try again": rerun the same
command to resume). Ctrl-C (SIGINT) does the same and raises `Interrupted` (exit
EXIT_INTERRUPTED = 130, the shell's code for Ctrl-C); a second Ctrl-C raises
KeyboardInterrupt at once, without saving (the last committed checkpoint stays the latest).

Skipped (non-finite) steps are not steps: they apply no update and get no row of their own in
metrics.jsonl. The next logged row counts them, `skipped_steps` = updates skipped since the
row before, so every row's step is unique.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import numpy as np

from jaxft.io import checkpoint
from jaxft.io.metrics import device_peak_flops, train_flops_per_token
from jaxft.parallel.prefetch import Prefetcher

log = logging.getLogger("jaxft")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run saved and stopped; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (saved, or not on a second Ctrl-C)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint has been written."""

    exit_code = EXIT_PREEMPTED
    cause = "preempted"

    def __init__(self, step: int):
        super().__init__(f"{self.cause}: saved step {step}; rerun the same command to resume")
        self.step = step


class Interrupted(Preempted):
    """Raised after a Ctrl-C-triggered (SIGINT) checkpoint has been written."""

    exit_code = EXIT_INTERRUPTED
    cause = "interrupted (Ctrl-C)"


class NonFiniteError(RuntimeError):
    pass


def _not_a_ctrl_c(record: logging.LogRecord) -> bool:
    """A logging filter: drops a library's error report of the KeyboardInterrupt the user asked
    for (Orbax logs the traceback of a wait it interrupts before re-raising it)."""
    kind = record.exc_info[0] if record.exc_info else None
    return not (kind is not None and issubclass(kind, KeyboardInterrupt))


class StopFlag:
    """Set by SIGTERM or a first SIGINT; checked at step boundaries. A second SIGINT raises
    KeyboardInterrupt at once (the user does not want to wait for the save)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the stop came from Ctrl-C
        self._previous = {}

    def install(self):
        def handler(signum, frame):
            if signum == signal.SIGINT and self.requested:
                log.warning("second Ctrl-C: stopping now, without saving")
                raise KeyboardInterrupt
            name = signal.Signals(signum).name
            if signum == signal.SIGINT:
                self.interrupted = True
                name = "Ctrl-C (SIGINT)"
            log.warning("%s received: saving at the next step boundary (Ctrl-C again: stop without saving)", name)
            self.requested = True

        try:
            self._previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = {}
        logging.getLogger("absl").addFilter(_not_a_ctrl_c)  # Orbax logs through absl

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        logging.getLogger("absl").removeFilter(_not_a_ctrl_c)

    def stopped(self, step: int) -> Preempted:
        """The exception that ends the run after the stop's checkpoint of `step` is written."""
        return Interrupted(step) if self.interrupted else Preempted(step)

    def due(self, step: int, every: int) -> bool:
        """Whether to check at `step`: at once on one host (a local flag costs nothing); with
        several, every `every` steps (all hosts agree on where, and the check is a gather)."""
        if jax.process_count() == 1:
            return self.requested
        return _every(step, every)

    def any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


def _every(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


class _Window:
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
        row["tokens_per_sec"] = (last.real_tokens - self.tokens_at_start) / elapsed
        row["step_time"] = elapsed / self.steps
        row["padding_fraction"] = last.padding_fraction
        row["epoch"] = float(last.epoch)
        if self.peak:
            flops = train_flops_per_token(self.model_config, last.length) * row["tokens_per_sec"]
            row["mfu"] = flops / (self.peak * jax.device_count())
        self._reset(last.real_tokens)
        return row


def non_finite_message(bad_in_a_row: int, train, done: int, checkpointer) -> str:
    """NonFiniteError's text: what stopped the run and what is left to resume from."""
    latest = checkpointer.latest_step()
    if latest is None:
        saved = (f"No checkpoint was saved yet (train.save_every={train.save_every}; {done} good steps): "
                 "a rerun starts from the beginning")
    else:
        saved = f"The last good checkpoint, step {latest} in {checkpointer.directory}, is intact"
    return (f"{bad_in_a_row} steps in a row after step {done} had non-finite loss or gradients "
            f"(train.max_bad_steps={train.max_bad_steps}); stopped. {saved}: lower optim.lr, check the "
            "data, or use float32.")


def train_loop(state, task, data, *, config, steps: int, model_config, checkpointer, writer, stop):
    """Steps `state` with `task` on batches of `data` until `steps` optimizer steps; returns
    (state, logged rows). Skipped (non-finite) steps do not count; `train.max_bad_steps` of
    them in a row stop the run."""
    from tqdm.auto import tqdm

    train = config.train
    # -1: at the end of every epoch (TRL's eval_strategy="epoch"), counted in batches.
    eval_every = data.batches_per_epoch() if train.eval_every == -1 else train.eval_every
    done = int(state["step"])  # optimizer steps applied, known exactly
    logged: list[dict] = []
    bad_in_a_row = 0
    skipped_since_row = 0  # updates skipped since the last row: the next row's `skipped_steps`
    window = _Window(data.real_tokens, model_config)
    # A resumed run must beat the best checkpoint kept before it stopped.
    best_eval = checkpoint.best_eval_loss(checkpointer.directory.parent) if train.keep_best else float("inf")
    pending = []  # dispatched steps whose metrics are not read yet: (metrics, Prepared), at most 2
    last = None  # the Prepared batch of the newest dispatched step

    def action_due(step):
        return (step == steps or _every(step, train.log_every) or _every(step, train.save_every)
                or (task.can_evaluate and _every(step, eval_every))
                or _every(step, train.sample_every)
                or stop.due(step, train.preemption_check_every))

    def resolve():
        """Reads the oldest dispatched step's outcome (a wait on that step only)."""
        nonlocal done, bad_in_a_row, skipped_since_row
        metrics, _ = pending.pop(0)
        if float(metrics["skipped"]):
            bad_in_a_row += 1
            skipped_since_row += 1
            log.warning("non-finite loss or gradients after step %d: update skipped (%d in a row)",
                        done, bad_in_a_row)
            if bad_in_a_row >= train.max_bad_steps:
                checkpointer.wait()
                raise NonFiniteError(non_finite_message(bad_in_a_row, train, done, checkpointer))
            return False
        bad_in_a_row = 0
        done += 1
        window.add(metrics)
        bar.update(1)
        return True

    def save(force=False):  # the state with the data position that produced it
        checkpointer.save(done, state, {"data": last.data_state, "config": config.to_dict()}, force=force)

    bar = tqdm(total=steps, initial=done, disable=not train.progress or jax.process_index() != 0,
               dynamic_ncols=True)
    batches = Prefetcher(data, task.ctx.mesh, depth=train.prefetch)
    try:
        while done < steps:
            last = next(batches)
            state, metrics = task.step(state, last.batch)
            pending.append((metrics, last))
            if len(pending) > 1:
                resolve()  # the previous step: the device already has this one queued
            if not action_due(done + 1):
                continue
            if not resolve():  # this step: its state is the one the actions need
                continue

            row = {}
            if _every(done, train.log_every) or done == steps:
                row = window.row(last, metrics)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")

            eval_now = task.can_evaluate and (_every(done, eval_every) or done == steps)
            if eval_now:
                row.update(task.evaluate(state["params"]))
            if row and skipped_since_row:
                row["skipped_steps"] = float(skipped_since_row)
                skipped_since_row = 0
            if row:
                writer.write(done, row)
                logged.append({"step": done, **row})
            if _every(done, train.sample_every):  # reads the params only: training is unchanged
                began = time.perf_counter()
                samples = task.sample(state["params"])
                writer.write_samples(done, samples)
                logged.append({"step": done, "samples": samples})
                window.exclude(time.perf_counter() - began)  # generation is not step time

            save_now = _every(done, train.save_every) or done == steps
            if save_now:
                save()
            if train.keep_best and eval_now and row.get("eval_loss", float("inf")) < best_eval:
                best_eval = row["eval_loss"]
                task.save_best(done, state, best_eval)

            # After the last step the run is complete: finish it (export) rather than stop.
            if done < steps and stop.due(done, train.preemption_check_every) and stop.any_host():
                if not save_now:  # Orbax refuses a second save of the same step
                    save(force=True)
                checkpointer.wait()
                raise stop.stopped(done)
    finally:
        batches.close()
        bar.close()
    checkpointer.wait()
    return state, logged
