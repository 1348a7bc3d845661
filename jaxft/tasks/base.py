"""What a training method is to the run: a `Task` built from a `RunContext` and the policy's initial params.

`jaxft.run` wires a RunContext once (config, mesh, tokenizer, model, optimizer, data) and
hands it, with the initial params, to `TASKS[kind]` (`jaxft.tasks`). The task jits its step and evaluates held-out data;
the loop (`jaxft.loop`) calls `task.step`, `task.evaluate`, `task.sample` and `task.save_best` and knows no
method and no batch layout. A new method is one file with a Task subclass plus one line in
the registry.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

from jaxft.eval.samples import Sampler
from jaxft.io import checkpoint
from jaxft.losses import resolve_chunk_size
from jaxft.steps.common import with_frozen



@dataclasses.dataclass(frozen=True)
class RunContext:
    """Everything a task needs to build its steps, wired once by `jaxft.run`.

    train_data: this host's `BatchIterator`; eval_data: its `EvalBatches`, or None.
    """
    config: Any  # the locked ml_collections.ConfigDict
    workdir: Path
    mesh: Any  # jax.sharding.Mesh
    tokenizer: Any
    model_config: Any  # jaxft.models.ModelConfig
    graphdef: Any  # nnx.GraphDef of the policy
    tx: Any  # optax.GradientTransformation
    schedule: Any  # optax.Schedule
    state_shardings: dict
    train_data: Any
    eval_data: Any = None
    frozen: Any = None  # LoRA: the frozen base params (the state's params are the adapters)
    frozen_shardings: Any = None

    def weights(self, params):
        """What the model is merged from: `params`, or (adapters, frozen base) with LoRA."""
        return with_frozen(params, self.frozen)

    def weight_shardings(self):
        return with_frozen(self.state_shardings["params"], self.frozen_shardings)

    @property
    def dropout_seed(self) -> int | None:
        """train.seed when LoRA dropout is on (the steps draw their masks from it), else None."""
        spec = self.model_config.lora
        return self.config.train.seed if spec is not None and spec.dropout > 0 else None

    def step_args(self) -> tuple:
        """The trailing arguments of a jitted step: (frozen base,) with LoRA, else ()."""
        return () if self.frozen is None else (self.frozen,)

    @property
    def loss_chunk_size(self) -> int:
        """train.loss_chunk_size, with -1 resolved for this model's vocabulary."""
        return resolve_chunk_size(self.config.train.loss_chunk_size, self.model_config.vocab_size)


class Task(abc.ABC):
    """One training method: `step(state, batch) -> (state, metrics)` (jitted, state donated)
    and `evaluate(params) -> {"eval_loss": ..., ...}` on the run's eval data; `sample(params)`
    generates from the eval prompts."""

    @classmethod
    def validate(cls, config) -> None:
        """Method-specific config checks, before anything is loaded (raise naming the key)."""

    @classmethod
    def rows_per_example(cls, config) -> int:
        """Device rows one training example occupies (for the batch divisibility check)."""
        return 1

    def __init__(self, ctx: RunContext, params: dict):
        """`params`: the policy's initial params (sharded nested dict): the train state's own
        buffers, which the first step donates, so use them only here and copy what you keep
        (as the DPO reference does)."""
        self.ctx = ctx
        self._best: checkpoint.Checkpointer | None = None
        self._sampler: Sampler | None = None

    @abc.abstractmethod
    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step on a global batch (dict of arrays from `to_global`)."""

    @abc.abstractmethod
    def evaluate(self, params) -> dict[str, float]:
        """Held-out metrics (prefixed `eval_`) of `params` on the run's eval data."""

    @property
    def can_evaluate(self) -> bool:
        return self.ctx.eval_data is not None

    def sample(self, params) -> list[dict]:
        """Greedy completions of the first `train.sample_prompts` eval prompts from `params`
        (`train.sample_every`): [{"prompt": str, "completion": str}]. The same for every
        method: generation needs only the model's weights."""
        if self._sampler is None:
            train = self.ctx.config.train
            examples = self.ctx.eval_data.examples[:train.sample_prompts]
            self._sampler = Sampler(self.ctx.graphdef, self.ctx.tokenizer, examples,
                                    max_new_tokens=train.sample_max_new_tokens)
        return self._sampler(self.ctx.weights(params))

    def save_best(self, step: int, state: dict, eval_loss: float) -> None:
        """Keeps `state` as WORKDIR/checkpoints_best (train.keep_best), replacing the last."""
        if self._best is None:
            self._best = checkpoint.Checkpointer(self.ctx.workdir, max_to_keep=1,
                                                 subdir=checkpoint.BEST_SUBDIR, async_save=False)
        self._best.save(step, state, {"eval_loss": eval_loss}, force=True)
