"""The step loop and its periodic actions: log, evaluate, save, keep the best, stop on SIGTERM.

The loop knows no training method and no batch layout: it asks the data for the next host
batch, makes it global (`jaxft.parallel.batches.to_global`), and hands it to `task.step`.

Preemption: SIGTERM makes the loop save at the next step boundary, wait for the write, and
raise `Preempted` (the CLI exits with EXIT_PREEMPTED = 75, "try again": rerun the same
command to resume).
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import numpy as np

from jaxft.io import checkpoint
from jaxft.io.metrics import device_peak_flops, train_flops_per_token
from jaxft.parallel.batches import to_global

log = logging.getLogger("jaxft")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run saved and stopped; rerun to resume


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint has been written."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}; rerun the same command to resume")
        self.step = step


class NonFiniteError(RuntimeError):
    pass


class StopFlag:
    """Set by SIGTERM; checked at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self):
        def handler(signum, frame):
            log.warning("SIGTERM received: saving at the next step boundary")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


def _every(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def train_loop(state, task, data, *, config, steps: int, model_config, checkpointer, writer, stop):
    """Steps `state` with `task` on batches of `data` until `steps` optimizer steps; returns
    (state, logged rows). Skipped (non-finite) steps do not count; `train.max_bad_steps` of
    them in a row stop the run."""
    from tqdm.auto import tqdm

    mesh = task.ctx.mesh
    step = int(state["step"])
    logged: list[dict] = []
    bad_in_a_row = 0
    peak = device_peak_flops()
    window = None  # on-device sums of the metrics since the last log
    window_steps, window_start, tokens_at_start = 0, time.perf_counter(), data.real_tokens
    # A resumed run must beat the best checkpoint kept before it stopped.
    best_eval = checkpoint.best_eval_loss(checkpointer.directory.parent) if config.train.keep_best else float("inf")

    def save(force=False):  # the state with the data position that produced it
        checkpointer.save(step, state, {"data": data.get_state(), "config": config.to_dict()}, force=force)

    bar = tqdm(total=steps, initial=step, disable=not config.train.progress or jax.process_index() != 0,
               dynamic_ncols=True)
    while step < steps:
        batch_np = next(data)
        state, metrics = task.step(state, to_global(batch_np, mesh))
        if float(metrics["skipped"]):
            bad_in_a_row += 1
            log.warning("non-finite loss or gradients at step %d: update skipped (%d in a row)",
                        step, bad_in_a_row)
            if bad_in_a_row >= config.train.max_bad_steps:
                checkpointer.wait()
                raise NonFiniteError(
                    f"{bad_in_a_row} steps in a row had non-finite loss or gradients (train.max_bad_steps="
                    f"{config.train.max_bad_steps}); stopped. The last good checkpoint in "
                    f"{checkpointer.directory} is intact: lower optim.lr, check the data, or use float32."
                )
            writer.write(step, {"skipped_steps": float(bad_in_a_row)})
            continue
        bad_in_a_row = 0
        step += 1
        window_steps += 1
        window = metrics if window is None else jax.tree.map(lambda a, b: a + b, window, metrics)
        bar.update(1)

        row = {}
        if _every(step, config.train.log_every) or step == steps:
            elapsed = time.perf_counter() - window_start
            # Averages over the steps since the last log (as TRL does); the rate is the current one.
            row = {k: float(v) / window_steps for k, v in jax.device_get(window).items() if k != "skipped"}
            row["learning_rate"] = float(metrics["learning_rate"])
            row["tokens_per_sec"] = (data.real_tokens - tokens_at_start) / elapsed
            row["step_time"] = elapsed / window_steps
            row["padding_fraction"] = float(data.padding_fraction)
            row["epoch"] = float(data.epoch)
            if peak:
                flops = train_flops_per_token(model_config, batch_np.tokens.shape[1]) * row["tokens_per_sec"]
                row["mfu"] = flops / (peak * jax.device_count())
            window, window_steps = None, 0
            window_start, tokens_at_start = time.perf_counter(), data.real_tokens
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")

        eval_now = task.can_evaluate and (_every(step, config.train.eval_every) or step == steps)
        if eval_now:
            row.update(task.evaluate(state["params"]))
        if row:
            writer.write(step, row)
            logged.append({"step": step, **row})

        save_now = _every(step, config.train.save_every) or step == steps
        if save_now:
            save()
        if config.train.keep_best and eval_now and row.get("eval_loss", float("inf")) < best_eval:
            best_eval = row["eval_loss"]
            task.save_best(step, state, best_eval)

        # After the last step the run is complete: finish it (export) rather than stop.
        if step < steps and stop.any_host():
            if not save_now:  # Orbax refuses a second save of the same step
                save(force=True)
            checkpointer.wait()
            bar.close()
            raise Preempted(step)
    bar.close()
    checkpointer.wait()
    return state, logged
