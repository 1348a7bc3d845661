"""Orbax checkpoints of a run: TrainState + data iterator state + config, and resumption.

Layout of a workdir:
  WORKDIR/config.json            the run's full config (written at start)
  WORKDIR/checkpoints/<step>/    state (Orbax, sharded arrays) + meta (JSON: iterator, config)
  WORKDIR/checkpoints_best/      with train.keep_best: the checkpoint with the lowest eval loss
Saves are asynchronous and atomic: Orbax writes into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxft.config import base_config

BEST_SUBDIR = "checkpoints_best"

# Changing any of these between a checkpoint and its resumption would silently change the run.
# Keys a resumed run must keep. The mesh, the number of processes and optim.accumulate may
# change: checkpoints reshard onto any mesh, and accumulation splits the same global batch.
RESUME_KEYS = (
    "model.path", "model.preset", "model.dtype", "data.train", "data.format", "data.max_length",
    "data.packing", "data.truncation", "data.completion_only_loss", "train.batch_size",
    "train.seed", "dpo.reference", "dpo.loss_type",
    "lora.rank", "lora.alpha", "lora.targets", "lora.rslora", "lora.base_quantization",
)


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resumable(saved_config: dict, config: dict, workdir: Path) -> None:
    """Raises if `config` differs from the checkpoint's in a key that breaks resumption. A key
    the saved config predates counts as its default (a run from before LoRA had lora.rank 0)."""
    defaults = base_config().to_dict()

    def saved(key):
        value = _get(saved_config, key)
        return _get(defaults, key) if value is None else value

    changed = [
        f"{key}: checkpoint {saved(key)!r} -> now {_get(config, key)!r}"
        for key in RESUME_KEYS
        if saved(key) != _get(config, key)
    ]
    if changed:
        raise ValueError(
            f"cannot resume {workdir}: the config changed in ways that break resumption ("
            + "; ".join(changed)
            + "). Use a new --workdir, or restore the old values."
        )


class Checkpointer:
    """Saves and restores TrainState (+ JSON meta) under WORKDIR/checkpoints."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 3, subdir: str = "checkpoints",
                 async_save: bool = True):
        self.directory = (Path(workdir) / subdir).absolute()  # Orbax rejects relative paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
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
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_params(self, step: int | None, abstract_params):
        """Only the policy params of a checkpoint (no optimizer state is read)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
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
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_json)


def read_config(workdir: Path) -> dict | None:
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None
