"""Orbax checkpoints of a run: TrainState + data iterator state + config, and resumption.

Layout of a workdir:
  WORKDIR/config.json            the run's full config (written at start)
  WORKDIR/checkpoints/<step>/    state (Orbax, sharded arrays) + meta (JSON: iterator, config)
  WORKDIR/checkpoints_best/      with train.keep_best: the checkpoint with the lowest eval loss
  WORKDIR/checkpoints_unrestorable/<step>/  a step that failed to restore, moved aside (kept)
Saves are asynchronous and atomic: Orbax writes into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest.

A committed step can still be damaged later (a disk full, a copy cut short, a file removed by
hand): `restore_newest_good` then falls back to the newest step that restores, and moves the
ones above it aside, so that Orbax neither skips the resumed run's saves (it saves no step
below its latest) nor fails on saving a step that exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxft.config import upgrade
from jaxft.errors import ConfigError, DataError, PathError, UserError
from jaxft.io import atomic

log = logging.getLogger("jaxft")

BEST_SUBDIR = "checkpoints_best"
UNRESTORABLE_SUBDIR = "checkpoints_unrestorable"

# Changing any of these between a checkpoint and its resumption would silently change the run.
# Keys a resumed run must keep. The mesh, the number of processes and optim.accumulate may
# change: checkpoints reshard onto any mesh, and accumulation splits the same global batch.
RESUME_KEYS = (
    "model.path", "model.preset", "model.dtype", "data.train", "data.format", "data.max_length",
    "data.packing", "data.truncation", "data.completion_only_loss", "train.batch_size",
    "train.seed", "dpo.reference", "dpo.loss_type", "dpo.online",
    "lora.rank", "lora.alpha", "lora.targets", "lora.rslora", "lora.base_quantization",
)


# Keys that may change on resume but change the run from there on: each change is logged.
# (train.steps and train.epochs set the schedule's length: a cosine decay stretches.)
SCHEDULE_KEYS = (
    "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.warmup_ratio", "optim.min_lr_ratio",
    "optim.weight_decay", "optim.clip_norm", "optim.b1", "optim.b2", "optim.eps",
    "train.steps", "train.epochs", "dpo.beta", "dpo.label_smoothing", "dpo.loss_weights",
    "dpo.f_divergence_type", "model.compute_dtype", "lora.dropout", "train.router_aux_loss_coef",
    "train.router_z_loss_coef", "train.router_bias_update_rate",
    # online DPO's sampling and rewards: the pairs from the resumed step on
    "dpo.online_rewards", "dpo.online_max_new_tokens", "dpo.online_temperature",
)

# Keys that may change on resume and do not count as a change (logged at info level): what is
# logged and where, when the run evaluates, samples and saves, how the same numbers are
# computed (kernels, remat, mesh, accumulation, prefetch, caches), and what is read only at a
# run's start (lora.init_from: a resume restores the checkpoint's adapters).
# data.skip_invalid: an in-memory run that trained had no invalid record (loading stops at the
# first), so turning it on skips nothing it saw, and any example that changes fails the data
# check below naming the source; a streaming run that stopped at an invalid record resumes with
# it on exactly as one that had it on from the start (jaxft.data.stream's docstring).
RESUME_FREE_KEYS = (
    "train.log_every", "train.progress", "train.report_to", "train.wandb_project",
    "data.eval", "data.eval_batch_size", "train.eval_every", "train.keep_best",
    "train.sample_every", "train.sample_prompts", "train.sample_max_new_tokens", "train.eval_benchmarks",
    "train.eval_benchmark_limit", "train.eval_benchmark_max_new_tokens",
    "train.save_every", "train.max_to_keep", "train.max_bad_steps", "train.prefetch",
    "train.preemption_check_every", "train.loss_chunk_size", "model.remat", "model.scan_layers",
    "model.attention", "model.moe_matmul", "model.linear_chunk_size", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.sequence", "mesh.expert",
    "optim.accumulate", "data.cache_dir", "data.num_proc", "dpo.precompute_reference", "lora.init_from", "data.skip_invalid",
    # jaxft iterate's own keys: a round's run never reads them (its rounds resume from their files)
    "iterate.prompts", "iterate.eval_prompts", "iterate.rounds", "iterate.samples", "iterate.prompts_per_round",
    "iterate.temperature", "iterate.top_p", "iterate.max_new_tokens", "iterate.rewards", "iterate.pairs",
    "iterate.min_margin", "iterate.pairs_per_prompt", "iterate.reference",
)

# Keys the data iterator's own state checks on resume (its settings, or the examples
# themselves): a refusal names the setting or the source that changed, and these keys.
ITERATOR_KEYS = ("data.streaming", "data.shuffle_buffer", "data.max_segments_per_row")
DATA_KEYS = ("data.chat_template", "model.tokenizer", "data.max_record_bytes")  # they decide the examples


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def changed_keys(saved_config: dict, config: dict, keys) -> list[str]:
    """"KEY: checkpoint OLD -> now NEW" for each of `keys` that differs. A key the saved config
    predates counts as the value its run had (`jaxft.config.upgrade`: a run from before LoRA
    had lora.rank 0)."""
    saved_config = upgrade(saved_config)
    return [f"{key}: checkpoint {_get(saved_config, key)!r} -> now {_get(config, key)!r}"
            for key in keys if _get(saved_config, key) != _get(config, key)]


def check_resumable(saved_config: dict, config: dict, workdir: Path) -> None:
    """Raises if `config` differs from the checkpoint's in a key that breaks resumption
    (RESUME_KEYS), naming each with its old and new value; logs a warning naming each changed
    optimizer / schedule key (SCHEDULE_KEYS), and each changed RESUME_FREE_KEYS key at info."""
    changed = changed_keys(saved_config, config, RESUME_KEYS)
    if changed:
        raise ConfigError(
            f"cannot resume {workdir}: the config changed in ways that break resumption ("
            + "; ".join(changed)
            + "). Use a new --workdir, or restore the old values."
        )
    for change in changed_keys(saved_config, config, SCHEDULE_KEYS):
        log.warning("resuming %s with a changed setting, used from the resumed step on: %s", workdir, change)
    for change in changed_keys(saved_config, config, RESUME_FREE_KEYS):
        log.info("resuming %s with %s (a key that may change on resume)", workdir, change)


def data_change_hint(saved_config: dict, config: dict) -> str:
    """For a resume the data iterator refused: the changed keys that decide which examples a
    source gives (DATA_KEYS, data.skip_invalid), "" if none did."""
    changed = changed_keys(saved_config, config, (*DATA_KEYS, "data.skip_invalid"))
    return f" Changed config keys that decide the examples: {'; '.join(changed)}." if changed else ""


class NoCheckpointRestores(UserError, RuntimeError):
    """Every saved step of a run is damaged (each moved aside, kept): one line saying what to do."""


class Checkpointer:
    """Saves and restores TrainState (+ JSON meta) under WORKDIR/checkpoints."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int | None = 3, subdir: str = "checkpoints",
                 async_save: bool = True):
        """`max_to_keep`: the newest steps kept; 0 or None keeps every step (train.max_to_keep=0;
        Orbax's 0 would delete each checkpoint as it is saved)."""
        self.directory = (Path(workdir) / subdir).absolute()  # Orbax rejects relative paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None, create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int | None, abstract_state):
        """(state, meta) at `step` (latest if None). `abstract_state` leaves are
        ShapeDtypeStructs with the target shardings, so a checkpoint restores onto any mesh."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise PathError(f"no checkpoint under {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_newest_good(self, abstract_state):
        """(state, meta, step) of the newest step that restores, newest first. A damaged step
        (`damage`: a file missing or cut short, bad metadata) is logged (step, file or error)
        and, once an older one has restored, moved to WORKDIR/checkpoints_unrestorable/
        (nothing is deleted); any other error (I/O, a timeout, a bug) is raised as is and
        moves nothing. Raises a one-line
        RuntimeError listing every step tried when none restores."""
        failed = []  # (step, error summary), newest first
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - sorted by `damage` below
                if not damage(err):  # a storage outage or a bug: raised as is, nothing moved
                    raise
                failed.append((step, error_summary(err)))
                log.warning("checkpoint step %d in %s does not restore (%s); trying the step before",
                            step, self.directory, failed[-1][1])
                continue
            if failed:
                self._move_aside([s for s, _ in failed])
                log.warning("resuming from step %d, the newest checkpoint that restores", step)
            return state, meta, step
        tried = "; ".join(f"step {s}: {e}" for s, e in failed)
        raise NoCheckpointRestores(f"no checkpoint in {self.directory} restores ({tried or 'no steps'}): "
                           "restore a copy of the folder, or start again in a new --workdir")

    def _move_aside(self, steps: list[int]) -> None:
        """Moves step folders to WORKDIR/checkpoints_unrestorable/<step> (process 0; all wait)."""
        aside = self.directory.parent / UNRESTORABLE_SUBDIR
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():  # the same step failed before: keep both
                    n += 1
                    target = aside / f"{step}.{n}"
                (self.directory / str(step)).rename(target)
                log.warning("moved unrestorable step %d to %s (kept for inspection; delete it when done)",
                            step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxft: unrestorable steps moved aside")
        self.manager.reload()  # Orbax caches the step list

    def restore_params(self, step: int | None, abstract_params):
        """Only the policy params of a checkpoint (no optimizer state is read)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise PathError(f"no checkpoint under {self.directory}")
        # StandardRestore insists on the whole saved tree; PyTreeRestore(partial_restore=True)
        # reads the subtree named in `item` and skips the rest (same on-disk format).
        item = {"params": abstract_params}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )),
        )
        return restored["state"]["params"]

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# TensorStore's status codes for bytes that are not what was written (cut short, gone, garbled).
# Others (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...) say the
# storage failed, not the step: a rerun may read it.
_DAMAGE_CODES = ("OUT_OF_RANGE", "FAILED_PRECONDITION", "DATA_LOSS", "NOT_FOUND")


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def damage(err: BaseException) -> bool:
    """Whether a failed restore is damage to the step itself, which no retry mends: a file
    missing or cut short (TensorStore's OUT_OF_RANGE, FAILED_PRECONDITION, DATA_LOSS,
    NOT_FOUND; FileNotFoundError), metadata that is not JSON, an item gone from the step.
    Anything else (an I/O error, a timeout, a permission, a bug) is not: the caller re-raises
    it instead of moving steps aside, so a storage hiccup costs no checkpoints."""
    for e in _chain(err):
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
            return True
        if isinstance(e, KeyError) and "not found in the checkpoint" in str(e):
            return True
        if type(e) is ValueError and str(e).startswith(_DAMAGE_CODES):
            return True
    return False


def error_summary(err: BaseException, limit: int = 300) -> str:
    """One line for a failed restore: the innermost cause (TensorStore's names the array and
    the file; Orbax's wrapper is a page of spec), cut to `limit` characters."""
    *_, err = _chain(err)
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (restoration targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def best_eval_loss(workdir: Path) -> float:
    """The eval loss of WORKDIR/checkpoints_best (inf if there is none yet)."""
    if not (Path(workdir) / BEST_SUBDIR).is_dir():
        return float("inf")
    best = Checkpointer(workdir, max_to_keep=1, subdir=BEST_SUBDIR, async_save=False)
    try:
        step = best.latest_step()
        return float("inf") if step is None else float(best.restore_meta(step)["eval_loss"])
    finally:
        best.close()


def workdir_path(workdir: str | Path) -> Path:
    """A run folder as an absolute path (Orbax rejects relative ones)."""
    return Path(workdir).absolute()


def write_config(workdir: Path, config_json: str) -> None:
    """WORKDIR/config.json (process 0), atomically: a kill leaves the old file or the new."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(workdir / "config.json", config_json)


def read_config(workdir: Path) -> dict | None:
    """WORKDIR/config.json, or None when there is none; ValueError naming the file when it is
    not a JSON object."""
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); the run's config is also in each checkpoint: "
                         f"restore the file from a copy, or start again in a new --workdir") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path}: not a JSON object; restore the file from a copy, or use a new --workdir")
    return saved
