"""Direct Preference Optimization and its relatives (every `dpo.loss_type` of TRL): the policy
against a frozen reference that is params, a precomputed table, or absent
(`jaxft.tasks.dpo_reference`)."""

from __future__ import annotations

from jaxft.errors import ConfigError
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import losses
from jaxft.data.pipeline import check_max_segments
from jaxft.eval.passes import pair_pass
from jaxft.steps.common import jit_step
from jaxft.steps.dpo import PAIR_KEYS, batch_shardings, make_dpo_step, make_pair_logps_fn
from jaxft.tasks.base import RunContext, StepSetup, Task, TrainStep, row_batch
from jaxft.tasks.dpo_reference import Reference, abstract_reference, prepare_reference


def loss_types(config) -> str | list[str]:
    """dpo.loss_type: one name, or a comma list combined with dpo.loss_weights."""
    types = [t.strip() for t in config.dpo.loss_type.split(",") if t.strip()]
    return types[0] if len(types) == 1 else types


def loss_weights(config) -> list[float] | None:
    if not config.dpo.loss_weights:
        return None
    try:
        return [float(w) for w in config.dpo.loss_weights.split(",")]
    except ValueError:
        raise ConfigError(
            f"config key dpo.loss_weights: {config.dpo.loss_weights!r} is not a comma-separated "
            "list of numbers, e.g. '1.0,0.5'"
        ) from None


def loss_kwargs(config) -> dict:
    """The keyword arguments of `jaxft.losses.dpo_loss` from the dpo.* config."""
    return dict(loss_type=loss_types(config), beta=config.dpo.beta,
                label_smoothing=config.dpo.label_smoothing, loss_weights=loss_weights(config),
                f_divergence_type=config.dpo.f_divergence_type)


class DPO(Task):
    @classmethod
    def validate(cls, config):
        losses.validate_dpo_settings(**loss_kwargs(config))
        if config.data.packing:  # a packed pair is two segments: SFT's >= 1 is not enough
            check_max_segments("dpo", config.data.max_segments_per_row)

    @classmethod
    def rows_per_example(cls, config):
        return 1 if config.data.packing else 2  # unpacked, a pair is a chosen and a rejected row

    @classmethod
    def pairs_per_batch(cls, config) -> int:
        """Pair slots of one step's batch: a pair per example, or with packing S // 2 a row."""
        b = config.train.batch_size
        return b * (config.data.max_segments_per_row // 2) if config.data.packing else b

    @classmethod
    def abstract_batch(cls, config, mesh) -> dict:
        shardings = batch_shardings(mesh)
        pairs = {k: jax.ShapeDtypeStruct((cls.pairs_per_batch(config),), jnp.int32, sharding=shardings[k])
                 for k in PAIR_KEYS}
        return {**row_batch(cls.batch_rows(config), config, shardings), **pairs}

    @classmethod
    def build_train_step(cls, setup: StepSetup, reference: Reference | None = None) -> TrainStep:
        reference = reference or Reference("none")
        config = setup.config
        step = make_dpo_step(setup.graphdef, setup.tx, setup.schedule, loss_kwargs=loss_kwargs(config),
                             reference_mode=reference.mode, num_segments=setup.num_segments,
                             rows_per_pair=cls.rows_per_example(config), accumulate=config.optim.accumulate,
                             loss_chunk_size=setup.loss_chunk_size, dropout_seed=setup.dropout_seed,
                             router=setup.router_training)
        jitted = jit_step(step, state_shardings=setup.state_shardings, batch_sharding=batch_shardings(setup.mesh),
                          leading_shardings=(reference.shardings,), frozen_shardings=setup.weights.frozen_shardings)
        return TrainStep(jitted, leading=(reference.value,), trailing=setup.weights.step_args())

    @classmethod
    def abstract_reference(cls, setup: StepSetup, params) -> Reference:
        return abstract_reference(setup, params, pairs=cls.pairs_per_batch(setup.config))

    @classmethod
    def create(cls, ctx: RunContext, params: dict) -> "DPO":
        """Prepares the reference (a copy, a folder, or a table precomputed over the data),
        then builds the train step against it."""
        logps = jax.jit(make_pair_logps_fn(ctx.graphdef, num_segments=ctx.num_segments,
                                           loss_chunk_size=ctx.loss_chunk_size))
        reference, eval_reference = prepare_reference(ctx, params, logps)
        return cls(ctx, cls.build_train_step(ctx, reference), reference, eval_reference, logps)

    def __init__(self, ctx: RunContext, train_step: TrainStep, reference: Reference, eval_reference, logps_fn):
        """eval_reference: the reference's merge weights (a live reference: its held-out
        log-probs are computed at the first evaluation and reused), the held-out table, or None."""
        super().__init__(ctx, train_step)
        self.reference = reference
        self._eval_reference = eval_reference
        self._eval_reference_logps = None  # (pair index, chosen, rejected) of a live reference
        self._logps = logps_fn

    def _held_out_reference(self, index):
        """Reference (chosen, rejected) log-probs of the held-out pairs `index`."""
        ctx = self.ctx
        if self.reference.variant == "none":
            zeros = np.zeros(len(index), np.float32)
            return zeros, zeros
        if self.reference.variant == "table":
            table = np.asarray(self._eval_reference)
            return table[index, 0], table[index, 1]
        # Frozen: computed at the first evaluation and reused (pair_pass orders pairs alike every pass).
        if self._eval_reference_logps is None or not np.array_equal(self._eval_reference_logps[0], index):
            ref, ref_index = pair_pass(self._logps, self._eval_reference, ctx.eval_data, ctx.mesh)
            self._eval_reference_logps = (ref_index, ref["chosen"], ref["rejected"])
        return self._eval_reference_logps[1:]

    def evaluate(self, params):
        """DPO loss and TRL's reward metrics over the held-out pairs (eval_loss,
        eval_rewards/accuracies, ...)."""
        ctx = self.ctx
        pol, index = pair_pass(self._logps, ctx.weights.merge_args(params), ctx.eval_data, ctx.mesh)
        if not len(index):
            return {}
        ref_c, ref_r = self._held_out_reference(index)
        loss, metrics = losses.dpo_loss(
            jnp.asarray(pol["chosen"]), jnp.asarray(pol["rejected"]), jnp.asarray(ref_c), jnp.asarray(ref_r),
            chosen_lengths=jnp.asarray(pol["chosen_lengths"]),
            rejected_lengths=jnp.asarray(pol["rejected_lengths"]), **loss_kwargs(ctx.config))
        out = {f"eval_{k}": float(v) for k, v in metrics.items()}
        out["eval_loss"] = float(loss)
        return out
