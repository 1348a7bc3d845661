"""Direct Preference Optimization and its relatives (every `dpo.loss_type` of TRL): the policy
against a frozen reference that is params, a precomputed table, or absent
(`jaxft.tasks.dpo_reference`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import losses
from jaxft.data.from_config import eval_batch_size
from jaxft.data.pipeline import check_max_segments
from jaxft.eval.passes import pair_pass
from jaxft.models.adapters import adapters_off
from jaxft.parallel.sharding import replicated
from jaxft.steps.dpo import jit_dpo_step, make_dpo_step, make_pair_logps_fn
from jaxft.tasks.base import RunContext, Task
from jaxft.tasks.dpo_reference import (
    cache_key, cached_table, load_reference_params, precompute_table, reference_mode,
)


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
        raise ValueError(
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

    def __init__(self, ctx: RunContext, params: dict):
        super().__init__(ctx, params)
        config = ctx.config
        self.mode = reference_mode(config)
        num_segments = ctx.train_data.max_segments_per_row
        chunk = ctx.loss_chunk_size
        self._logps = jax.jit(make_pair_logps_fn(ctx.graphdef, num_segments=num_segments, loss_chunk_size=chunk))
        self.reference = self.eval_reference = None
        self._eval_reference_logps = None  # (pair index, chosen, rejected): see `evaluate`
        # With LoRA the reference is a base run with the adapters off (zeros: exactly the base).
        self._adapters_off = adapters_off(params) if ctx.frozen is not None else None
        if self.mode == "params":
            self.reference = self.eval_reference = load_reference_params(ctx, params)
            if self.reference is ctx.frozen:  # LoRA against its own base: the step reads `frozen`
                self.reference = None
        elif self.mode == "table":
            self.reference, self.eval_reference = self._precompute(
                self._reference_weights(load_reference_params(ctx, params)))
        step = make_dpo_step(ctx.graphdef, ctx.tx, ctx.schedule, loss_kwargs=loss_kwargs(config),
                             reference_mode=self.mode, num_segments=num_segments,
                             rows_per_pair=self.rows_per_example(config),
                             accumulate=config.optim.accumulate, loss_chunk_size=chunk,
                             dropout_seed=ctx.dropout_seed)
        ref_shardings = {"params": None if self.reference is None else jax.tree.map(lambda x: x.sharding, self.reference),
                         "table": replicated(ctx.mesh), "none": None}[self.mode]
        self._step = jit_dpo_step(step, state_shardings=ctx.state_shardings,
                                  reference_shardings=ref_shardings, mesh=ctx.mesh,
                                  frozen_shardings=ctx.frozen_shardings)

    def _reference_weights(self, reference):
        """What the model merges for a reference pass: the reference params, or with LoRA
        (adapters off, reference base)."""
        return reference if self._adapters_off is None else (self._adapters_off, reference)

    def _precompute(self, ref_params):
        """(train table, eval table or None): one reference pass over the data the run has
        already loaded, or the tables cached by an earlier run with the same key. The
        reference params are dropped afterwards: no reference forward per step."""
        ctx = self.ctx
        key = cache_key(ctx.config, ctx.train_data.get_state()["fingerprint"])

        def table(split_key, batches):
            return jnp.asarray(cached_table(ctx.workdir, {**key, **split_key}, lambda: precompute_table(
                self._logps, ref_params, batches, ctx.mesh)))

        train = table({"split": "train"}, ctx.train_data.one_pass(eval_batch_size(ctx.config)))
        held_out = None
        if ctx.eval_data is not None:
            held_out = table({"split": "eval", "eval": ctx.config.data.eval}, ctx.eval_data)
        return train, held_out

    def step(self, state, batch):
        return self._step(state, self.reference, batch, *self.ctx.step_args())

    def evaluate(self, params):
        """DPO loss and TRL's reward metrics over the held-out pairs (eval_loss,
        eval_rewards/accuracies, ...)."""
        ctx = self.ctx
        pol, index = pair_pass(self._logps, ctx.weights(params), ctx.eval_data, ctx.mesh)
        if not len(index):
            return {}
        if self.mode == "params":
            # The reference is frozen: its held-out log-probs are computed at the first
            # evaluation and reused (pair_pass orders the pairs the same way every pass).
            if self._eval_reference_logps is None or not np.array_equal(self._eval_reference_logps[0], index):
                ref, ref_index = pair_pass(self._logps, self._reference_weights(self.eval_reference), ctx.eval_data,
                                           ctx.mesh)
                self._eval_reference_logps = (ref_index, ref["chosen"], ref["rejected"])
            _, ref_c, ref_r = self._eval_reference_logps
        elif self.mode == "table":
            table = np.asarray(self.eval_reference)
            ref_c, ref_r = table[index, 0], table[index, 1]
        else:
            ref_c = ref_r = np.zeros(len(index), np.float32)
        loss, metrics = losses.dpo_loss(
            jnp.asarray(pol["chosen"]), jnp.asarray(pol["rejected"]), jnp.asarray(ref_c), jnp.asarray(ref_r),
            chosen_lengths=jnp.asarray(pol["chosen_lengths"]),
            rejected_lengths=jnp.asarray(pol["rejected_lengths"]), **loss_kwargs(ctx.config))
        out = {f"eval_{k}": float(v) for k, v in metrics.items()}
        out["eval_loss"] = float(loss)
        return out
