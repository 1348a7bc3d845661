"""What every train step shares: micro-batches, gradient accumulation, the non-finite guard,
per-token log-probs of a batch, and jit with explicit shardings.

Steps are `step(state, batch) -> (state, metrics)` on a TrainState (`jaxft.steps.state`);
batches are dicts of [B, L] int32 global arrays (tokens, positions, segment_ids, loss_mask)
whose rows split over (data, fsdp, expert).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import losses
from jaxft.parallel.sharding import token_groups, vocab_parallel_axes

ROW_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def split_micro_batches(batch: dict, accumulate: int, rows_per_unit: int = 1) -> dict:
    """[B, ...] -> [accumulate, B / accumulate, ...], dealing units of `rows_per_unit` rows
    round-robin: unit u (rows u*g .. u*g+g-1) goes to micro-batch u % accumulate.

    Round-robin rather than contiguous so that each device's rows spread over every
    micro-batch (all devices work on every micro-step); units keep a DPO pair's chosen and
    rejected rows (rows 2i, 2i+1 without packing) in the same micro-batch.
    """
    g = rows_per_unit

    def split(x):
        x = x.reshape((x.shape[0] // (accumulate * g), accumulate, g) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape((accumulate, x.shape[1] * g) + x.shape[3:])

    return jax.tree.map(split, batch)


def micro_batch_row(row, accumulate: int, rows_per_unit: int = 1):
    """(micro-batch, row within it) of global batch row `row` under `split_micro_batches`."""
    unit, offset = row // rows_per_unit, row % rows_per_unit
    return unit % accumulate, (unit // accumulate) * rows_per_unit + offset


def with_frozen(params, frozen):
    """What `nnx.merge(graphdef, ...)` needs: the params, or (trainable, frozen) with LoRA."""
    return params if frozen is None else (params, frozen)


def merge_model(graphdef, weights):
    """The model from `with_frozen`'s result (one params tree, or a (trainable, frozen) pair)."""
    return nnx.merge(graphdef, *weights) if isinstance(weights, tuple) else nnx.merge(graphdef, weights)


def dropout_key(seed: int | None, step, micro_index):
    """The LoRA dropout key of one micro-batch of one optimizer step (None: no dropout).
    A function of (seed, step, micro-batch) only, so a resumed run draws the same masks."""
    if seed is None:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_index)


class RouterTraining(NamedTuple):
    """How a mixture of experts' routing is trained: transformers' load-balancing loss times
    `aux_coef` and ST-MoE's router z-loss times `z_coef` join the loss (`train.router_*_coef`);
    `bias_update_rate` > 0 moves DeepSeek-V3's selection biases after each update
    (`jaxft.steps.router_bias`, `train.router_bias_update_rate`)."""
    aux_coef: float = 0.0
    z_coef: float = 0.0
    bias_update_rate: float = 0.0


class TokenLogps(NamedTuple):
    """What a forward pass gives the losses, each [B, L]: target log-probs (f32), the target
    mask, argmax == target, the mean logit (TRL's logits/* metrics); `router`: the MoE layers'
    routing stats (`jaxft.models.moe.router_stats` per MoE layer; `with_router` only, else None)."""
    logps: jax.Array
    target_mask: jax.Array
    correct: jax.Array
    mean_logits: jax.Array
    router: tuple | None = None


def token_logps_for(graphdef, params, batch: dict, *, loss_chunk_size: int = 0, dropout_rng=None,
                    with_router: bool = False) -> TokenLogps:
    """Per-token target log-probs of a batch (`TokenLogps`). `params`: a params tree, or
    (adapters, frozen base) for a LoRA model. dropout_rng: LoRA dropout (training only).
    with_router: also the routing of a mixture of experts (for `router_loss_terms`).

    loss_chunk_size > 0: logits only at trained positions, that many tokens a chunk on each
    device (`losses.chunked_token_logps`; the other positions read 0), with each device's own
    columns of the vocabulary when the mesh splits lm_head (`vocab_parallel_axes`); 0: the
    model's whole [B, L, V] logits."""
    model = merge_model(graphdef, params)
    targets, target_mask = losses.shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    extra = {"return_router_stats": True} if with_router else {}
    router = None
    if loss_chunk_size:
        hidden = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True,
                       dropout_rng=dropout_rng, **extra)
        if with_router:
            hidden, router = hidden
        lm_head = model.lm_head_kernel().astype(hidden.dtype)
        logps, correct, mean_logits = losses.chunked_token_logps(
            hidden, lm_head, targets, target_mask,
            chunk_size=loss_chunk_size, groups=token_groups(*targets.shape),
            logit_softcap=model.cfg.final_logit_softcap,
            vocab_parallel=vocab_parallel_axes(*targets.shape, lm_head.shape),
            lm_head_vocab_major=model.cfg.tie_word_embeddings,
        )
    else:
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_rng=dropout_rng, **extra)
        if with_router:
            logits, router = logits
        logps, correct = losses.full_token_logps(logits, targets)
        mean_logits = logits.astype(jnp.float32).mean(axis=-1)
    return TokenLogps(logps, target_mask, correct, mean_logits, router)


def router_loss_terms(router, segment_ids, loss: RouterTraining) -> tuple[jax.Array, dict]:
    """(the routing's share of the loss, {"moe/aux_loss", "moe/z_loss", expert-load metrics,
    "router_picks": [M, X] picks per MoE layer, for the bias update}) of one forward's routing
    over its real tokens (`segment_ids` > 0)."""
    picks, probs, z = router
    num_tokens = jnp.sum(segment_ids > 0)
    aux = losses.load_balancing_loss(picks, probs, num_tokens)
    z_loss = losses.router_z_loss(z, num_tokens)
    metrics = {"moe/aux_loss": aux, "moe/z_loss": z_loss, **losses.expert_load_metrics(picks), "router_picks": picks}
    return loss.aux_coef * aux + loss.z_coef * z_loss, metrics


def accumulate_gradients(loss_fn: Callable, params, micro_batches, *, accumulate: int):
    """Sums loss, grads and metrics of `loss_fn(params, micro) -> (loss, metrics)` over the
    leading micro-batch axis. loss_fn must already normalise by the whole batch."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))
    if accumulate == 1:
        return loss, metrics, grads

    def body(carry, micro):
        (loss, metrics), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    rest = jax.tree.map(lambda x: x[1:], micro_batches)
    (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), rest)
    return loss, metrics, grads


def apply_update(state: dict, grads, loss, tx: optax.GradientTransformation):
    """Applies the optimizer unless loss or gradients are non-finite; then leaves params and
    optimizer state bit-identical and reports `skipped` = 1."""
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt_state}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {"grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32)}


def jit_step(step_fn, *, state_shardings, batch_sharding, frozen_shardings=None, leading_shardings=(),
             donate: bool = True):
    """jax.jit of `step(state, *leading, batch, frozen)` with explicit shardings: the state keeps
    its param shardings, the batch is split by rows over (data, fsdp, expert) (`batch_sharding`: one
    sharding, or a dict of them by key), `leading` arguments (DPO's frozen reference) and the
    frozen params (a LoRA base, or None: no argument) keep theirs, metrics come back
    replicated; the old state is donated so the update happens in place (never the
    frozen arguments). The one jit of every method's train step."""
    frozen = () if frozen_shardings is None else (frozen_shardings,)  # full fine-tuning: (state, batch)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, *leading_shardings, batch_sharding, *frozen),  # batch rows split
        out_shardings=(state_shardings, None),  # new state as the old; metrics replicated
        donate_argnums=(0,) if donate else (),  # reuse the old state's buffers
    )
