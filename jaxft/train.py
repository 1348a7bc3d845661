"""`jaxft.train.run(config, workdir)`: the SFT / DPO training loop.

The loop owns no math: it builds the mesh, model, data iterator, optimizer and jitted step,
resumes from the workdir's latest checkpoint, then steps, logs, evaluates and saves.
Preemption: SIGTERM makes the loop save at the next step boundary, wait for the write, and
raise `Preempted` (the CLI exits with EXIT_PREEMPTED = 75, "try again": rerun the same
command to resume).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np

from jaxft import builders, checkpoint, config as config_lib, sharding
from jaxft.metrics import MetricsWriter, device_peak_flops, train_flops_per_token
from jaxft.optim import optimizer_from_config
from jaxft.train_step import create_train_state

log = logging.getLogger("jaxft")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run saved and stopped; rerun to resume


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint has been written."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}; rerun the same command to resume")
        self.step = step


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class RunResult:
    workdir: Path
    step: int
    metrics: list[dict]  # every logged row
    export_dir: Path | None


class _StopFlag:
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


def to_global(batch_np, mesh) -> dict:
    """Host-local numpy batch (dataclass) -> dict of global arrays split by rows over hosts.

    DPO batches address rows by index (`chosen_row`, `rejected_row`); those are host-local
    from the pipeline, so each host offsets them by the rows of the hosts before it.
    """
    rows = sharding.batch_sharding(mesh)
    local_rows = batch_np.tokens.shape[0]
    out = {}
    for field in dataclasses.fields(batch_np):
        if field.name == "example_index":  # host-side bookkeeping, not needed on device
            continue
        value = np.asarray(getattr(batch_np, field.name))
        if field.name.endswith("_row"):
            value = value + jax.process_index() * local_rows
        if value.ndim == 1:
            # Per-pair arrays are small and their count need not divide the devices: gather
            # every host's pairs and replicate them.
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                value = np.asarray(multihost_utils.process_allgather(value, tiled=True))
            out[field.name] = jax.make_array_from_process_local_data(sharding.replicated(mesh), value)
        else:
            out[field.name] = jax.make_array_from_process_local_data(rows, value)
    return out


def total_steps(config, iterator) -> int:
    """train.steps, or train.epochs passes over the data (counted in batches, so packed rows
    and per-host slicing are accounted for)."""
    if config.train.epochs > 0:
        return max(1, int(round(config.train.epochs * iterator.batches_per_epoch())))
    return config.train.steps


def run(config, workdir: str | Path, *, kind: str = "sft", export: bool = True) -> RunResult:
    """Trains (or resumes) a run in `workdir`; returns the logged metrics and export folder."""
    from jaxft.data.pipeline import make_eval_batches, make_train_iterator
    from jaxft import step_builders

    # Config errors first, before anything is written to the workdir.
    config_lib.validate(config, kind=kind)
    mesh = builders.mesh_from_config(config)
    rows_per_example = 2 if kind == "dpo" and not config.data.packing else 1
    builders.check_batch_divisibility(config, mesh, rows_per_example=rows_per_example)
    workdir = builders.workdir_path(workdir)
    config_dict = config.to_dict()
    saved = checkpoint.read_config(workdir)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    resuming = ckpt.latest_step() is not None
    if resuming and saved is not None:
        checkpoint.check_resumable(saved, config_dict, workdir)
    checkpoint.write_config(workdir, config_lib.to_json(config))

    tokenizer = builders.load_tokenizer(config)
    model_cfg = builders.model_config(config, tokenizer)

    load_kwargs = builders.load_kwargs(config)
    iterator = make_train_iterator(
        config.data.train, tokenizer, kind=kind, global_batch_size=config.train.batch_size,
        max_length=config.data.max_length, packing=config.data.packing, seed=config.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), load_kwargs=load_kwargs,
        max_segments_per_row=config.data.max_segments_per_row,
    )
    eval_batches = []
    if config.data.eval:
        eval_batches = make_eval_batches(
            config.data.eval, tokenizer, kind=kind,
            batch_size=config.data.eval_batch_size or config.train.batch_size,
            max_length=config.data.max_length, packing=config.data.packing,
            process_index=jax.process_index(), process_count=jax.process_count(), load_kwargs=load_kwargs,
            max_segments_per_row=config.data.max_segments_per_row,
        )
    steps = total_steps(config, iterator)
    tx, schedule = optimizer_from_config(config.optim, steps)

    with jax.set_mesh(mesh):
        model = builders.load_model(config, model_cfg, mesh)
        graphdef, params = builders.split_params(model)
        del model
        state, state_shardings = create_train_state(params, tx, mesh)
        task = step_builders.build(kind, config, graphdef, tx, schedule, params, mesh, tokenizer,
                                   state_shardings=state_shardings, workdir=workdir,
                                   train_iterator=iterator)
        del params

        if resuming:
            abstract = checkpoint.abstract_like(state, state_shardings)
            state, meta = ckpt.restore(None, abstract)
            iterator.set_state(meta["data"])
            log.info("resumed %s at step %d", workdir, int(state["step"]))

        writer = MetricsWriter(workdir, start_step=int(state["step"]))
        stop = _StopFlag()
        stop.install()
        try:
            history = _loop(config, state, task, iterator, eval_batches, ckpt, writer, stop, steps,
                            model_cfg, mesh)
        finally:
            stop.restore()
            writer.close()
            ckpt.close()  # also when the loop raised: finishes a save in flight
        state, logged = history
        export_dir = None
        if export:
            from jaxft.export import export_params

            export_dir = export_params(graphdef, state["params"], workdir / "hf", tokenizer=tokenizer)
    return RunResult(workdir=workdir, step=int(state["step"]), metrics=logged, export_dir=export_dir)


def _loop(config, state, task, iterator, eval_batches, ckpt, writer, stop, steps, model_cfg, mesh):
    from tqdm.auto import tqdm

    step = int(state["step"])
    logged: list[dict] = []
    bad_in_a_row = 0
    peak = device_peak_flops()
    last_time = time.perf_counter()
    window_tokens = 0
    window_steps = 0
    window = None  # on-device sums of the metrics since the last log
    # A resumed run must beat the best checkpoint kept before it stopped.
    best_eval = checkpoint.best_eval_loss(ckpt.directory.parent) if config.train.keep_best else float("inf")
    def save(force=False):  # the state with the data position that produced it
        ckpt.save(step, state, {"data": iterator.get_state(), "config": config.to_dict()}, force=force)

    bar = tqdm(total=steps, initial=step, disable=not config.train.progress or jax.process_index() != 0,
               dynamic_ncols=True)
    while step < steps:
        batch_np = next(iterator)
        batch = to_global(batch_np, mesh)
        window_tokens += int((np.asarray(batch_np.segment_ids) > 0).sum()) * jax.process_count()
        new_state, metrics = task.step(state, batch)
        skipped = float(metrics["skipped"])
        state = new_state
        if skipped:
            bad_in_a_row += 1
            log.warning("non-finite loss or gradients at step %d: update skipped (%d in a row)",
                        step, bad_in_a_row)
            if bad_in_a_row >= config.train.max_bad_steps:
                ckpt.wait()
                raise NonFiniteError(
                    f"{bad_in_a_row} steps in a row had non-finite loss or gradients (train.max_bad_steps="
                    f"{config.train.max_bad_steps}); stopped. The last good checkpoint in {ckpt.directory} "
                    "is intact: lower optim.lr, check the data, or use float32."
                )
            writer.write(step, {"skipped_steps": float(bad_in_a_row)})
            continue
        bad_in_a_row = 0
        step += 1
        window_steps += 1
        window = metrics if window is None else jax.tree.map(lambda a, b: a + b, window, metrics)
        bar.update(1)
        row = None
        if step % config.train.log_every == 0 or step == steps:
            now = time.perf_counter()
            elapsed = now - last_time
            # Averages over the steps since the last log (as TRL does); the rate is the current one.
            row = {k: float(v) / window_steps for k, v in jax.device_get(window).items() if k != "skipped"}
            row["learning_rate"] = float(metrics["learning_rate"])
            row["tokens_per_sec"] = window_tokens / elapsed
            row["step_time"] = elapsed / max(window_steps, 1)
            row["padding_fraction"] = float(getattr(iterator, "padding_fraction", 0.0))
            row["epoch"] = float(getattr(iterator, "epoch", 0))
            if peak:
                flops = train_flops_per_token(model_cfg, batch_np.tokens.shape[1]) * row["tokens_per_sec"]
                row["mfu"] = flops / (peak * jax.device_count())
            last_time, window_tokens, window_steps, window = time.perf_counter(), 0, 0, None
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
        eval_now = eval_batches and (
            (config.train.eval_every and step % config.train.eval_every == 0) or step == steps
        )
        if eval_now:
            row = row or {}
            row.update(task.evaluate(state["params"], eval_batches))
        if row:
            writer.write(step, row)
            logged.append({"step": step, **row})
        save_now = bool(config.train.save_every and step % config.train.save_every == 0) or step == steps
        if save_now:
            save()
        if config.train.keep_best and eval_now and row.get("eval_loss", float("inf")) < best_eval:
            best_eval = row["eval_loss"]
            task.save_best(step, state, best_eval)
        # After the last step the run is complete: finish it (export) rather than stop.
        if step < steps and stop.any_host():
            if not save_now:  # Orbax refuses a second save of the same step
                save(force=True)
            ckpt.wait()
            bar.close()
            raise Preempted(step)
    bar.close()
    ckpt.wait()
    return state, logged
