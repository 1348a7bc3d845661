"""What a training method is to the run, to `jaxft plan` and to `jaxft bench`: a `Task`.

A method is one file: a `Task` subclass that builds its train step from a `StepSetup`
(`build_train_step`: the pure step, its shardings and the arguments it takes besides the state
and the batch) and lays out its batch (`abstract_batch`). `jaxft.run` wires a `RunContext` (a
StepSetup with the run's data, tokenizer and workdir) and calls `TASKS[kind].create(ctx,
params)`; `jaxft plan` builds the same StepSetup from shapes alone and takes the step from the
same classmethod, so what plan compiles is what a run compiles; `jaxft bench` times the same
steps. The loop (`jaxft.loop`) calls `task.step`, `task.evaluate` and `task.sample` and knows
no method and no batch layout. A new method is one file plus one line in `jaxft.tasks.TASKS`.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.eval.samples import Sampler
from jaxft.losses import resolve_chunk_size
from jaxft.parallel.sharding import batch_sharding
from jaxft.steps.common import ROW_KEYS, RouterTraining
from jaxft.steps.weights import Weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSetup:
    """What a method's steps are built from: concrete in a run and the bench, shapes
    (ShapeDtypeStructs with shardings) when `jaxft plan` compiles for a pod."""
    config: Any  # the run config (jaxft.config.Config, typed; a ConfigDict reads the same)
    model_config: Any  # jaxft.models.ModelConfig
    mesh: Any  # jax.sharding.Mesh
    weights: Weights  # graphdef, trainable/frozen split and shardings
    tx: Any  # optax.GradientTransformation
    schedule: Any  # optax.Schedule
    state_shardings: dict

    @property
    def graphdef(self):
        return self.weights.graphdef

    @property
    def loss_chunk_size(self) -> int:
        """train.loss_chunk_size, with -1 resolved for this model's vocabulary."""
        return resolve_chunk_size(self.config.train.loss_chunk_size, self.model_config.vocab_size)

    @property
    def dropout_seed(self) -> int | None:
        """train.seed when LoRA dropout is on (the steps draw their masks from it), else None."""
        spec = self.model_config.lora
        return self.config.train.seed if spec is not None and spec.dropout > 0 else None

    @property
    def router_training(self) -> RouterTraining | None:
        """train.router_* for a mixture-of-experts model (its routing is then read and reported),
        None for a dense one."""
        train, cfg = self.config.train, self.model_config
        if train.router_bias_update_rate and not (cfg.router_bias and cfg.lora is None):
            why = "trains adapters only (the biases are part of the frozen base)" if cfg.router_bias else \
                "has no expert-selection bias (DeepSeek-V3's e_score_correction_bias)"
            raise ConfigError(f"train.router_bias_update_rate={train.router_bias_update_rate}: this model ({cfg.model_type}) "
                              f"{why}; set it to 0")
        if not cfg.num_experts:
            return None
        return RouterTraining(train.router_aux_loss_coef, train.router_z_loss_coef, train.router_bias_update_rate)

    @property
    def num_segments(self) -> int:
        """S, the segment axis of the batches: data.max_segments_per_row when packing, else 1."""
        data = self.config.data
        return data.max_segments_per_row if data.packing else 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunContext(StepSetup):
    """A StepSetup with what only a run has. train_data: this host's `BatchIterator`;
    eval_data: its `EvalBatches`, or None."""
    workdir: Path
    tokenizer: Any
    train_data: Any
    eval_data: Any = None


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A method's jitted train step and the arguments it takes besides the state and the batch:
    `leading` before the batch (DPO's reference), `trailing` after it (the LoRA base). Called
    as `step(state, batch) -> (state, metrics)`; `lower(state, batch)` is what plan compiles."""
    jitted: Any  # jax.jit(step, in_shardings=..., donate_argnums=(0,))
    leading: tuple = ()
    trailing: tuple = ()

    def __call__(self, state, batch):
        return self.jitted(state, *self.leading, batch, *self.trailing)

    def lower(self, state, batch):
        return self.jitted.lower(state, *self.leading, batch, *self.trailing)


def row_batch(rows: int, config, shardings: dict) -> dict:
    """The [rows, data.max_length] int32 row arrays of a global batch as ShapeDtypeStructs."""
    return {k: jax.ShapeDtypeStruct((rows, config.data.max_length), jnp.int32, sharding=shardings[k])
            for k in ROW_KEYS}


class Task(abc.ABC):
    """One training method: `step(state, batch) -> (state, metrics)` (jitted, state donated),
    `evaluate(params) -> {"eval_loss": ..., ...}` on the run's eval data and `sample(params)`,
    greedy completions of the eval prompts."""

    @classmethod
    def validate(cls, config) -> None:
        """Method-specific config checks, before anything is loaded (raise naming the key)."""

    @classmethod
    def load_data(cls, config, tokenizer, *, kind: str, workdir) -> tuple[Any, Any]:
        """(this host's train iterator, its eval batches or None) for `config`: data.train and
        data.eval tokenised as `kind`'s records (`jaxft.data.from_config`)."""
        from jaxft.data.from_config import eval_data, train_data

        return (train_data(config, tokenizer, kind=kind, workdir=workdir),
                eval_data(config, tokenizer, kind=kind, workdir=workdir))

    @classmethod
    def rows_per_example(cls, config) -> int:
        """Device rows one training example occupies (for the batch divisibility check)."""
        return 1

    @classmethod
    def batch_rows(cls, config) -> int:
        """Global rows of one step's batch."""
        return config.train.batch_size * cls.rows_per_example(config)

    @classmethod
    def abstract_batch(cls, config, mesh) -> dict:
        """One step's global batch as int32 ShapeDtypeStructs with the step's shardings."""
        rows = batch_sharding(mesh)
        return row_batch(cls.batch_rows(config), config, {k: rows for k in ROW_KEYS})

    @classmethod
    @abc.abstractmethod
    def build_train_step(cls, setup: StepSetup, reference=None) -> TrainStep:
        """The method's jitted train step for `setup` (concrete or abstract); `reference`:
        what the method compares against (DPO's `Reference`), None for SFT."""

    @classmethod
    def abstract_reference(cls, setup: StepSetup, params):
        """The `reference` argument of `build_train_step` as shapes, for plan (None for SFT);
        `params`: the abstract trainable params."""
        return None

    @classmethod
    def create(cls, ctx: RunContext, params: dict) -> "Task":
        """The run's Task. `params`: the policy's initial params (sharded nested dict): the
        train state's own buffers, which the first step donates, so use them only here and
        copy what you keep (as the DPO reference does)."""
        return cls(ctx, cls.build_train_step(ctx))

    def __init__(self, ctx: RunContext, train_step: TrainStep):
        self.ctx = ctx
        self.train_step = train_step
        self._sampler: Sampler | None = None
        self._benchmarks = None

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step on a global batch (dict of arrays from `to_global`)."""
        return self.train_step(state, batch)

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
        return self._sampler(self.ctx.weights.merge_args(params))

    def prepare_benchmarks(self) -> None:
        """Reads `train.eval_benchmarks`' data and builds their problems (before the first step,
        so bad data fails at start-up)."""
        from jaxft.eval.train_benchmarks import TrainBenchmarks

        self._benchmarks = TrainBenchmarks(self.ctx.config.train, self.ctx.tokenizer,
                                           samples_dir=Path(self.ctx.workdir) / "benchmarks")

    def benchmarks(self, params, step: int | None = None) -> dict[str, float]:
        """`train.eval_benchmarks` scored greedily on `params`: {"eval/NAME/pass@1": ..., ...};
        each evaluation's completions go to WORKDIR/benchmarks/NAME/step_N.jsonl. Reads the
        weights only, as `sample` does."""
        from jaxft.steps.common import merge_model

        if self._benchmarks is None:
            self.prepare_benchmarks()
        return self._benchmarks(merge_model(self.ctx.graphdef, self.ctx.weights.merge_args(params)), step)
