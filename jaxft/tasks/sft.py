"""Supervised fine-tuning: token-mean NLL on the trained tokens (`jaxft.steps.sft`)."""

from __future__ import annotations

import jax

from jaxft.eval.passes import sum_over_batches, token_metrics
from jaxft.parallel.sharding import batch_sharding
from jaxft.steps.common import jit_step
from jaxft.steps.sft import make_sft_eval_step, make_sft_step
from jaxft.tasks.base import RunContext, StepSetup, Task, TrainStep


class SFT(Task):
    @classmethod
    def build_train_step(cls, setup: StepSetup, reference=None) -> TrainStep:
        step = make_sft_step(setup.graphdef, setup.tx, setup.schedule, accumulate=setup.config.optim.accumulate,
                             loss_chunk_size=setup.loss_chunk_size, dropout_seed=setup.dropout_seed,
                             router=setup.router_training)
        jitted = jit_step(step, state_shardings=setup.state_shardings, batch_sharding=batch_sharding(setup.mesh),
                          frozen_shardings=setup.weights.frozen_shardings)
        return TrainStep(jitted, trailing=setup.weights.step_args())

    def __init__(self, ctx: RunContext, train_step: TrainStep):
        super().__init__(ctx, train_step)
        self._eval = jax.jit(make_sft_eval_step(ctx.graphdef, loss_chunk_size=ctx.loss_chunk_size),
                             in_shardings=(ctx.weights.shardings(), batch_sharding(ctx.mesh)))

    def evaluate(self, params):
        weights = self.ctx.weights.merge_args(params)
        return token_metrics(sum_over_batches(self._eval, weights, self.ctx.eval_data, self.ctx.mesh))
