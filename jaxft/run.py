"""`jaxft.run(config, workdir, kind="sft")`: one training run, wired top to bottom.

validate the config -> check the workdir is one a run may write into (missing, empty or a
run's: `jaxft.io.folders.check_workdir`) -> lock it (one run at a time, `jaxft.io.lock`) ->
check it can resume -> mesh -> tokenizer -> data -> model and train state -> the method's Task
(`jaxft.tasks.TASKS[kind]`) -> restore the newest checkpoint that restores -> the step loop
(`jaxft.loop`) -> export a Hugging Face folder. `--workdir` of an existing run resumes it.
"""

from __future__ import annotations

from jaxft.errors import DataError
import dataclasses
import logging
from pathlib import Path

import jax

from jaxft import config as config_lib
from jaxft.data.from_config import load_tokenizer
from jaxft.io import checkpoint, folders, lock
from jaxft.io.export import export_run
from jaxft.io.metrics import MetricsWriter
from jaxft.loop import StopFlag, train_loop
from jaxft.models.from_config import load_trainable, model_config
from jaxft.parallel.agreement import check_hosts_agree
from jaxft.parallel.sharding import check_batch_divisibility, check_expert_divisibility, mesh_from_config
from jaxft.steps.optimizer import optimizer_from_config
from jaxft.steps.state import create_train_state
from jaxft.steps.weights import Weights
from jaxft.tasks import RunContext, get_task

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class RunResult:
    workdir: Path
    step: int
    metrics: list[dict]  # every logged row
    export_dir: Path | None  # WORKDIR/hf: a full HF folder (LoRA adapters merged in; none for QLoRA)
    adapter_dir: Path | None = None  # WORKDIR/adapter: the PEFT adapter of a LoRA run


def run_length(config, data) -> tuple[int, str]:
    """(optimizer steps, what set them). train.steps when > 0 (it wins over train.epochs, as
    TRL's max_steps), else train.epochs passes over `data` counted in its batches_per_epoch()
    (packed rows and per-host slicing accounted for)."""
    if config.train.steps > 0:
        ignored = f"; train.epochs={config.train.epochs:g} ignored" if config.train.epochs > 0 else ""
        return config.train.steps, f"{config.train.steps} steps (train.steps{ignored})"
    batches = data.batches_per_epoch()
    steps = max(1, int(round(config.train.epochs * batches)))
    return steps, f"{steps} steps = {config.train.epochs:g} epochs x {batches} batches (train.epochs)"


def total_steps(config, data) -> int:
    """The run's optimizer steps (`run_length`)."""
    return run_length(config, data)[0]


def run(config, workdir: str | Path, *, kind: str = "sft", export: bool = True, hooks=()) -> RunResult:
    """Trains (or resumes) a run in `workdir`; returns the logged metrics and export folder.
    hooks: extra `jaxft.loop.Hook`s (e.g. `Hook(fn, every=100)`), run after the built-in ones."""
    # Config errors first, before anything is written to the workdir.
    get_task(kind)  # an unknown kind, named before the config is read
    config = config_lib.validate(config)  # the typed, frozen Config from here on (jaxft.config.schema)
    task_type = get_task(kind, config)  # dpo.online: online DPO
    task_type.validate(config)
    # Nothing is written before this: a model, export, dataset or foreign folder is refused.
    folders.check_workdir(workdir, config)
    check_hosts_agree(config)  # multi-host: same jaxft, config, model, tokenizer and data everywhere
    mesh = mesh_from_config(config)
    check_batch_divisibility(config, mesh, rows_per_example=task_type.rows_per_example(config))

    workdir = checkpoint.workdir_path(workdir)
    # Before anything else writes there: a second run on the workdir stops here, naming the first.
    with lock.acquire_for_run(workdir):
        return _run_locked(config, workdir, kind, task_type, mesh, export, hooks)


def _resume(ckpt, abstract_state, train, config, saved) -> dict:
    """The newest checkpoint that restores (a damaged one falls back to the one before: logged,
    moved aside, kept), with the data iterator at its position."""
    state, meta, _ = ckpt.restore_newest_good(abstract_state)
    try:
        train.set_state(meta["data"])
    except ValueError as err:  # data changed: name the keys that may explain it
        hint = checkpoint.data_change_hint(meta.get("config") or saved or {}, config.to_dict())
        raise DataError(f"{err}{hint}") from None
    log.info("resumed %s at step %d", ckpt.directory.parent, int(state["step"]))
    return state


def _run_locked(config, workdir: Path, kind: str, task_type, mesh, export: bool, hooks=()) -> RunResult:
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    resuming = ckpt.latest_step() is not None
    # A run that never saved a step starts afresh, whatever config.json it left.
    saved = checkpoint.read_config(workdir) if resuming else None
    if saved is not None:
        checkpoint.check_resumable(saved, config.to_dict(), workdir)
    # Written before the data is read: the marker that makes a rerun of a run stopped while
    # tokenising (or killed) resume or restart instead of being refused as a foreign folder.
    checkpoint.write_config(workdir, config_lib.to_json(config))

    tokenizer = load_tokenizer(config)
    model_cfg = model_config(config, tokenizer)
    check_expert_divisibility(model_cfg.num_experts, mesh)
    train, held_out = task_type.load_data(config, tokenizer, kind=kind, workdir=workdir)
    steps, length = run_length(config, train)
    log.info("run length: %s", length)
    tx, schedule = optimizer_from_config(config.optim, steps)

    with jax.set_mesh(mesh):
        # LoRA: `params` are the adapters and `frozen` the base, never donated or updated.
        graphdef, params, frozen = load_trainable(config, model_cfg, mesh)
        state, state_shardings = create_train_state(params, tx, mesh)
        del params  # the state holds its own copy
        context = RunContext(config=config, model_config=model_cfg, mesh=mesh,
                             weights=Weights.of(graphdef, state_shardings["params"], frozen), tx=tx,
                             schedule=schedule, state_shardings=state_shardings, workdir=workdir,
                             tokenizer=tokenizer, train_data=train, eval_data=held_out)
        task = task_type.create(context, state["params"])
        if resuming:
            state = _resume(ckpt, checkpoint.abstract_like(state, state_shardings), train, config, saved)

        writer = MetricsWriter(workdir, report_to=config.train.report_to, start_step=int(state["step"]),
                               config=config.to_dict())
        stop = StopFlag()
        stop.install()
        completed = interrupted = False
        try:
            state, logged = train_loop(state, task, train, config=config, steps=steps, model_config=model_cfg,
                                       checkpointer=ckpt, writer=writer, stop=stop, hooks=hooks)
            completed = True
        except KeyboardInterrupt:  # a second Ctrl-C: the user will not wait for a save
            interrupted = True
            raise
        finally:
            stop.restore()
            writer.close(completed=completed)  # the trackers' runs end; final metrics if it finished
            if not interrupted:
                ckpt.close()  # also when the loop raised: finishes a save in flight
        export_dir = adapter_dir = None
        if export:
            export_dir, adapter_dir = export_run(model_cfg, graphdef, state["params"], frozen, workdir,
                                                 base_model=config.model.path, tokenizer=tokenizer)
    return RunResult(workdir=workdir, step=int(state["step"]), metrics=logged, export_dir=export_dir,
                     adapter_dir=adapter_dir)
