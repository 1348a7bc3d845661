"""Mixture-of-experts training signals from the routing of each MoE layer: the load-balancing
auxiliary loss (transformers' `load_balancing_loss_func`, so numbers compare), the router
z-loss (ST-MoE's) and expert-load metrics. Arrays in, arrays out: the per-layer sums come from the model
(`Decoder(..., return_router_stats=True)`, `jaxft.models.moe.router_stats`).

Axis letters: M MoE layers, X experts.
"""

import jax.numpy as jnp


def load_balancing_loss(picks_MX, probs_MX, num_tokens):
    """X * sum_x f_x * P_x, with f_x the share of tokens whose top k include expert x and P_x its
    mean router probability, both averaged over every MoE layer's real tokens (transformers
    concatenates the layers' router logits before averaging; so does this).

    Args:
      picks_MX: per layer, how many of the tokens' k picks went to each expert.
      probs_MX: per layer, the sum of each expert's router probability over the tokens.
      num_tokens: the real tokens each layer routed (scalar).
    Returns: float32 scalar; 1.0 * k for perfectly balanced routing, up to X * k when collapsed.
    """
    layers, experts = picks_MX.shape
    denom = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0) * layers
    f_X = jnp.sum(picks_MX.astype(jnp.float32), axis=0) / denom
    p_X = jnp.sum(probs_MX.astype(jnp.float32), axis=0) / denom
    return experts * jnp.sum(f_X * p_X)


def router_z_loss(z_M, num_tokens):
    """ST-MoE's router z-loss: the mean over every MoE layer's real tokens of
    logsumexp(router logits) ** 2, which keeps the logits small (transformers' SwitchTransformers
    `router_z_loss_func` over the layers' concatenated logits).

    Args:
      z_M: per layer, the sum of logsumexp(logits) ** 2 over the tokens.
      num_tokens: the real tokens each layer routed (scalar).
    """
    denom = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0) * z_M.shape[0]
    return jnp.sum(z_M.astype(jnp.float32)) / denom


def bias_balancing_update(picks_MX, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: each MoE layer's selection bias moves by
    `rate` towards even load, down for experts picked more often than the layer's mean expert,
    up for those picked less, unchanged at the mean: [M, X] float32 to add to the biases."""
    picks = picks_MX.astype(jnp.float32)
    return rate * jnp.sign(jnp.mean(picks, axis=-1, keepdims=True) - picks)


def expert_load_metrics(picks_MX) -> dict:
    """How evenly tokens spread over experts, averaged over MoE layers: "moe/load_max_over_mean"
    (the busiest expert's picks over the mean expert's: 1 when even, X when one expert takes
    all) and "moe/busiest_share" (its share of all picks: 1 / X when even)."""
    picks = picks_MX.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(picks, axis=-1), 1.0)
    busiest = jnp.max(picks, axis=-1)
    return {"moe/load_max_over_mean": jnp.mean(busiest / (total / picks.shape[-1])),
            "moe/busiest_share": jnp.mean(busiest / total)}
