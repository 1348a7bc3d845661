"""The step loop: dispatch steps, count the applied ones, and run the hooks where they are due.

The loop knows no training method and no batch layout: batches come ready-made and global
from a background thread (`jaxft.parallel.prefetch`), and `task.step` does the rest. Its
periodic work (log, evaluate, sample, save, keep the best, stop on a signal) is hooks
(`jaxft.loop.hooks`).

It never waits on the device between ordinary steps: step t+1 is dispatched before step t's
`skipped` flag (the non-finite guard) is read, so the device always has work queued. It waits
only at steps where a hook is due and at the last step, where the state must be exact; skipped
steps are found one step late, and `train.max_bad_steps` of them in a row stop the run within
one step.

Skipped (non-finite) steps are not steps: they apply no update and get no row of their own in
metrics.jsonl. The next logged row counts them, `skipped_steps` = updates skipped since the
row before, so every row's step is unique.
"""

from __future__ import annotations

import logging

import jax

from jaxft.errors import UserError
from jaxft.loop.hooks import Hook, Record, StepInfo, default_hooks
from jaxft.parallel.prefetch import Prefetcher

log = logging.getLogger("jaxft")


class NonFiniteError(UserError, RuntimeError):
    """The run diverged: train.max_bad_steps non-finite steps in a row. A user error (one line):
    the message names the last checkpoint and the keys to change (optim.lr, ...)."""


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


class _Outcomes:
    """The dispatched steps whose outcome is not read yet (at most 2), read in order: counts
    the applied ones (`done`) and hands their metrics to the hooks; counts skipped (non-finite)
    ones into the next row and stops the run after train.max_bad_steps in a row."""

    def __init__(self, done: int, *, train, checkpointer, hooks, record: Record, bar):
        self.done, self.pending, self.bad_in_a_row = done, [], 0
        self.train, self.checkpointer, self.hooks, self.record, self.bar = train, checkpointer, hooks, record, bar

    def resolve(self) -> bool:
        """Reads the oldest dispatched step's outcome (a wait on that step only): applied?"""
        metrics = self.pending.pop(0)
        if float(metrics["skipped"]):
            self.bad_in_a_row += 1
            self.record.skipped += 1
            log.warning("non-finite loss or gradients after step %d: update skipped (%d in a row)",
                        self.done, self.bad_in_a_row)
            if self.bad_in_a_row >= self.train.max_bad_steps:
                self.checkpointer.wait()
                raise NonFiniteError(non_finite_message(self.bad_in_a_row, self.train, self.done, self.checkpointer))
            return False
        self.bad_in_a_row = 0
        self.done += 1
        self.hooks.observe(metrics)
        self.bar.update(1)
        return True


def train_loop(state, task, data, *, config, steps: int, model_config, checkpointer, writer, stop,
               hooks: tuple[Hook, ...] = ()):
    """Steps `state` with `task` on batches of `data` until `steps` optimizer steps; returns
    (state, logged rows). Skipped (non-finite) steps do not count; `train.max_bad_steps` of
    them in a row stop the run. `hooks`: more `Hook`s, run after the config's own
    (`jaxft.loop.hooks.default_hooks`)."""
    from tqdm.auto import tqdm

    train = config.train
    record = Record(writer)
    run_hooks = default_hooks(task, data, config=config, model_config=model_config, checkpointer=checkpointer,
                              record=record, stop=stop)
    for hook in hooks:
        run_hooks.add(hook)
    bar = tqdm(total=steps, initial=int(state["step"]), disable=not train.progress or jax.process_index() != 0,
               dynamic_ncols=True)
    outcomes = _Outcomes(int(state["step"]), train=train, checkpointer=checkpointer, hooks=run_hooks,
                         record=record, bar=bar)
    batches = Prefetcher(data, task.ctx.mesh, depth=train.prefetch)
    interrupted = False
    try:
        while outcomes.done < steps:
            last = next(batches)
            state, metrics = task.step(state, last.batch)
            outcomes.pending.append(metrics)
            if len(outcomes.pending) > 1:
                outcomes.resolve()  # the previous step: the device already has this one queued
            step = outcomes.done + 1
            if step != steps and not run_hooks.due(step, steps):
                continue
            if not outcomes.resolve():  # this step: its state is the one the hooks need
                continue
            info = StepInfo(step=outcomes.done, steps=steps, state=state, metrics=metrics, batch=last)
            run_hooks.run(info, record)
            if "loss" in info.row:
                bar.set_postfix(loss=f"{info.row['loss']:.4f}", tok_s=f"{info.row['tokens_per_sec']:.0f}")
    except KeyboardInterrupt:  # a second Ctrl-C: no waiting on anything
        interrupted = True
        raise
    finally:
        batches.close()
        bar.close()
        if not interrupted:
            run_hooks.close()
    checkpointer.wait()
    return state, record.rows
