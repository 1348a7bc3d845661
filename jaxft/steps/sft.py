"""The pure SFT step and its eval counterpart."""

from __future__ import annotations

import jax.numpy as jnp

from jaxft import losses
from jaxft.steps.common import (
    ROW_KEYS, RouterTraining, accumulate_gradients, apply_update, dropout_key, router_loss_terms, split_micro_batches,
    token_logps_for, with_frozen,
)
from jaxft.steps.router_bias import balance_router_bias


def make_sft_step(graphdef, tx, schedule, *, accumulate: int = 1, loss_chunk_size: int = 0,
                  dropout_seed: int | None = None, router: RouterTraining | None = None):
    """The pure SFT step `(state, batch, frozen=None) -> (state, metrics)` (not yet jitted:
    `jit_step` adds shardings and donation). `frozen`: the LoRA base (state params are then
    the adapters), never differentiated. dropout_seed: LoRA dropout keys (`dropout_key`).
    router: how a mixture of experts' routing trains (`RouterTraining`: its losses join the loss,
    its selection biases move), and the expert load is reported (None: a dense model)."""
    moe = router is not None

    def loss_fn(params, micro, normalizer, frozen, step):
        rows, k = micro
        out = token_logps_for(graphdef, with_frozen(params, frozen), rows, loss_chunk_size=loss_chunk_size,
                              dropout_rng=dropout_key(dropout_seed, step, k), with_router=moe)
        loss, _ = losses.sft_loss(out.logps, out.target_mask, normalizer=normalizer)
        mask = out.target_mask.astype(jnp.float32)
        counts = {"num_tokens": mask.sum(), "num_correct": (out.correct * mask).sum()}
        if moe:  # each micro-batch's routing; averaged over them below
            aux, router_metrics = router_loss_terms(out.router, rows["segment_ids"], router)
            loss = loss + aux / accumulate
            counts.update({name: value / accumulate for name, value in router_metrics.items()
                           if name != "router_picks"}, router_picks=router_metrics["router_picks"])
        return loss, counts

    def step(state, batch, frozen=None):
        micro = split_micro_batches({k: batch[k] for k in ROW_KEYS}, accumulate)
        _, target_mask = losses.shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
        # Normalise by the whole batch's target tokens so accumulation equals one big batch.
        normalizer = jnp.maximum(target_mask.astype(jnp.float32).sum(), 1.0)
        loss, counts, grads = accumulate_gradients(
            lambda p, m: loss_fn(p, m, normalizer, frozen, state["step"]), state["params"],
            (micro, jnp.arange(accumulate)), accumulate=accumulate,
        )
        new_state, update_metrics = apply_update(state, grads, loss, tx)
        if moe and router.bias_update_rate:
            new_state = balance_router_bias(graphdef, new_state, counts["router_picks"], router.bias_update_rate,
                                            update_metrics["skipped"])
        metrics = {
            "loss": loss,
            "learning_rate": schedule(state["step"]),
            "num_tokens": counts["num_tokens"],
            "mean_token_accuracy": counts["num_correct"] / jnp.maximum(counts["num_tokens"], 1.0),
            **{name: value for name, value in counts.items() if name.startswith("moe/")},
            **update_metrics,
        }
        return new_state, metrics

    return step


def make_sft_eval_step(graphdef, *, loss_chunk_size: int = 0):
    """(params, batch) -> summed target NLL and token count, for exact token-mean eval loss.
    params: a params tree, or `with_frozen(adapters, base)`."""

    def step(params, batch):
        out = token_logps_for(graphdef, params, batch, loss_chunk_size=loss_chunk_size)
        mask = out.target_mask.astype(jnp.float32)
        return {"nll_sum": -(out.logps * mask).sum(), "num_tokens": mask.sum(),
                "num_correct": (out.correct * mask).sum()}

    return step
