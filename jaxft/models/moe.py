"""Mixture-of-experts MLP: a router picks `k` experts per token; every (token, expert) pair runs,
sorted by expert, through grouped matmuls (`jax.lax.ragged_dot`), so routing is dropless: no
capacity factor, no dropped token, whatever the imbalance.

Routing follows transformers: softmax over the router's logits in float32, the top k, optionally
renormalised to sum to 1 (Mixtral always; Qwen's `norm_topk_prob`). Qwen2-MoE adds a shared
expert (a dense gated MLP) whose output is scaled by sigmoid(shared_expert_gate(x)).

Axis letters: T tokens, E embed, X experts, K experts per token, F expert hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.expert_parallel import over_mesh
from jaxft.models.parts import ACTIVATIONS, param as _param
from jaxft.models.quantize import kernel_value


def route(logits_TX: jax.Array, k: int, *, normalize: bool):
    """(weights [T, K] f32, experts [T, K] int32, probs [T, X] f32): softmax routing, top k."""
    probs_TX = jax.nn.softmax(logits_TX.astype(jnp.float32), axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TX, k)
    if normalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, experts_TK.astype(jnp.int32), probs_TX


def dropless_experts(x_TE, weights_TK, experts_TK, gate_XEF, up_XEF, down_XFE, activation: str):
    """sum over k of weights[t, k] * expert[experts[t, k]](x[t]) for gated-MLP experts, every
    pair computed: the T * K pairs sorted by expert, one ragged matmul per projection."""
    T, K = experts_TK.shape
    X = gate_XEF.shape[0]
    flat = experts_TK.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, in token order within one
    token_of = order // K
    group_sizes = jnp.bincount(flat, length=X).astype(jnp.int32)
    xs = jnp.take(x_TE, token_of, axis=0)
    h = ACTIVATIONS[activation](jax.lax.ragged_dot(xs, gate_XEF, group_sizes))
    h = h * jax.lax.ragged_dot(xs, up_XEF, group_sizes)
    y = jax.lax.ragged_dot(h, down_XFE, group_sizes)
    y = y * jnp.take(weights_TK.reshape(-1), order).astype(y.dtype)[:, None]
    return jnp.zeros_like(x_TE).at[token_of].add(y)


def router_stats(probs_TX, experts_TK, mask_T):
    """(picks [X], probs [X]): over the tokens where mask_T is set, how many of their k picks
    went to each expert and the sum of each expert's router probability. Summed over a model's
    MoE layers they give `jaxft.losses.load_balancing_loss` and the expert-load metrics."""
    X = probs_TX.shape[-1]
    mask = mask_T.astype(jnp.float32)[:, None]
    picks = jnp.sum(jnp.sum(jax.nn.one_hot(experts_TK, X, dtype=jnp.float32), axis=1) * mask, axis=0)
    return picks, jnp.sum(probs_TX * mask, axis=0)


class MoE(nnx.Module):
    """Router, `cfg.num_experts` gated-MLP experts (stacked kernels), optional shared expert.
    Called on [..., E] activations and a token mask (1 for real tokens, in the same order);
    returns (output of x's shape, `router_stats` over the masked tokens)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        E, X, F, pd = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.param_dtype
        self.router = _param(rngs, (E, X), ("embed", None), pd)
        self.gate_proj = _param(rngs, (X, E, F), ("experts", "embed", "mlp"), pd)
        self.up_proj = _param(rngs, (X, E, F), ("experts", "embed", "mlp"), pd)
        self.down_proj = _param(rngs, (X, F, E), ("experts", "mlp", "embed"), pd)
        if cfg.shared_expert_size:
            S = cfg.shared_expert_size
            self.shared_gate_proj = _param(rngs, (E, S), ("embed", "mlp"), pd)
            self.shared_up_proj = _param(rngs, (E, S), ("embed", "mlp"), pd)
            self.shared_down_proj = _param(rngs, (S, E), ("mlp", "embed"), pd)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = _param(rngs, (E, 1), ("embed", None), pd)
        self.k, self.normalize, self.activation = cfg.experts_per_token, cfg.norm_topk_prob, cfg.activation
        self.shared, self.shared_gated = bool(cfg.shared_expert_size), cfg.shared_expert_gate

    def __call__(self, x, rng=None, token_mask=None):
        x_TE = x.reshape(-1, x.shape[-1])
        dtype = x_TE.dtype
        logits_TX = x_TE @ kernel_value(self.router, dtype)
        weights_TK, experts_TK, probs_TX = route(logits_TX, self.k, normalize=self.normalize)
        mask_T = jnp.ones(x_TE.shape[:1], bool) if token_mask is None else token_mask.reshape(-1)
        experts = over_mesh(dropless_experts)  # split over the mesh's expert axis when it has one
        y_TE = experts(x_TE, weights_TK.astype(dtype), experts_TK, kernel_value(self.gate_proj, dtype),
                       kernel_value(self.up_proj, dtype), kernel_value(self.down_proj, dtype), self.activation)
        if self.shared:
            act = ACTIVATIONS[self.activation]
            h = act(x_TE @ kernel_value(self.shared_gate_proj, dtype)) * (x_TE @ kernel_value(self.shared_up_proj, dtype))
            shared_TE = h @ kernel_value(self.shared_down_proj, dtype)
            if self.shared_gated:
                shared_TE = shared_TE * jax.nn.sigmoid(x_TE @ kernel_value(self.shared_expert_gate, dtype))
            y_TE = y_TE + shared_TE
        return y_TE.reshape(x.shape), router_stats(probs_TX, experts_TK, mask_T)
