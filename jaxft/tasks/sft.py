"""Supervised fine-tuning: token-mean NLL on the trained tokens (`jaxft.steps.sft`)."""

from __future__ import annotations

import jax

from jaxft.eval.passes import sum_over_batches, token_metrics
from jaxft.parallel.sharding import batch_sharding
from jaxft.steps.common import jit_step
from jaxft.steps.sft import make_sft_eval_step, make_sft_step
from jaxft.tasks.base import RunContext, Task


class SFT(Task):
    def __init__(self, ctx: RunContext, params: dict):
        super().__init__(ctx, params)
        chunk = ctx.loss_chunk_size
        step = make_sft_step(ctx.graphdef, ctx.tx, ctx.schedule, accumulate=ctx.config.optim.accumulate,
                             loss_chunk_size=chunk, dropout_seed=ctx.dropout_seed)
        rows = batch_sharding(ctx.mesh)
        self._step = jit_step(step, state_shardings=ctx.state_shardings, batch_sharding=rows,
                              frozen_shardings=ctx.frozen_shardings)
        self._eval = jax.jit(make_sft_eval_step(ctx.graphdef, loss_chunk_size=chunk),
                             in_shardings=(ctx.weight_shardings(), rows))

    def step(self, state, batch):
        return self._step(state, batch, *self.ctx.step_args())

    def evaluate(self, params):
        weights = self.ctx.weights(params)
        return token_metrics(sum_over_batches(self._eval, weights, self.ctx.eval_data, self.ctx.mesh))
