"""Mixture-of-experts MLP: a router picks `k` experts per token; every (token, expert) pair runs,
grouped by expert, through grouped matmuls (`jaxft.models.grouped_matmul`), so routing is
dropless: no capacity factor, no dropped token, whatever the imbalance.

Routing follows transformers: softmax over the router's logits in float32, the top k, optionally
renormalised to sum to 1 (Mixtral always; Qwen's `norm_topk_prob`). Qwen2-MoE adds a shared
expert (a dense gated MLP) whose output is scaled by sigmoid(shared_expert_gate(x)); DeepSeek's
shared experts are one such MLP without the gate. DeepSeek-V2 / V3 route by groups of experts,
V3 by sigmoid scores plus a frozen selection bias (`route`). gpt-oss's router has a bias on its
logits and takes the softmax of the top k logits (the renormalised top k of the softmax, the
same numbers); its experts have biases and the clamped SwiGLU (`jaxft.models.parts.gated`).

Axis letters: T tokens, E embed, X experts, K experts per token, F expert hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import grouped_matmul, lora
from jaxft.models.expert_parallel import over_mesh
from jaxft.models.parts import ACTIVATIONS, gated, param as _param
from jaxft.models.quantize import kernel_value


def route(logits_TX: jax.Array, k: int, *, normalize: bool, scoring: str = "softmax", groups: int = 1,
          topk_groups: int = 1, bias_X: jax.Array | None = None, scale: float = 1.0):
    """(weights [T, K] f32, experts [T, K] int32, probs [T, X] f32): softmax routing, top k.

    DeepSeek's options (any one set takes `_grouped_route`): scoring "sigmoid" (V3), experts in
    `groups` groups of which the best `topk_groups` are eligible, a selection bias, the weights
    times `scale` (routed_scaling_factor)."""
    if scoring != "softmax" or groups > 1 or bias_X is not None or scale != 1.0:
        return _grouped_route(logits_TX, k, normalize=normalize, scoring=scoring, groups=groups,
                              topk_groups=topk_groups, bias_X=bias_X, scale=scale)
    probs_TX = jax.nn.softmax(logits_TX.astype(jnp.float32), axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TX, k)
    if normalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, experts_TK.astype(jnp.int32), probs_TX


def _grouped_route(logits_TX, k, *, normalize, scoring, groups, topk_groups, bias_X, scale):
    """DeepSeek routing, as transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter.

    V2 (softmax): with groups, each group scores its best expert's probability; experts
    outside the best topk_groups groups get 0 and the top k of the rest are taken.
    V3 (sigmoid): choice = sigmoid scores + bias_X (selection only); each group scores the sum
    of its two best choices; experts outside the best groups are excluded; the weights are the
    unbiased scores of the k chosen. normalize: weights / (their sum + 1e-20). Then * scale.
    probs (for `router_stats` and the load-balancing loss): the softmax, or the sigmoid scores
    normalised to sum to 1 per token."""
    logits_TX = logits_TX.astype(jnp.float32)
    T, X = logits_TX.shape
    sigmoid = scoring == "sigmoid"
    scores_TX = jax.nn.sigmoid(logits_TX) if sigmoid else jax.nn.softmax(logits_TX, axis=-1)
    choice_TX = scores_TX if bias_X is None else scores_TX + bias_X.astype(jnp.float32)[None, :]
    if groups > 1:
        grouped = choice_TX.reshape(T, groups, X // groups)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1) if sigmoid else grouped.max(-1)  # [T, groups]
        _, best = jax.lax.top_k(group_score, topk_groups)
        keep = jnp.sum(jax.nn.one_hot(best, groups, dtype=jnp.int32), axis=1) > 0  # [T, groups]
        keep_TX = jnp.repeat(keep, X // groups, axis=1)
        choice_TX = jnp.where(keep_TX, choice_TX, -jnp.inf if sigmoid else 0.0)
    _, experts_TK = jax.lax.top_k(choice_TX, k)
    weights_TK = jnp.take_along_axis(scores_TX if sigmoid or bias_X is not None else choice_TX, experts_TK, axis=1)
    if normalize:
        weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
    probs_TX = scores_TX / jnp.sum(scores_TX, axis=-1, keepdims=True) if sigmoid else scores_TX
    return weights_TK * scale, experts_TK.astype(jnp.int32), probs_TX


def dropless_experts(x_TE, weights_TK, experts_TK, gate_XEF, up_XEF, down_XFE, activation: str,
                     matmul: str | None = None, *, biases=None, limit: float = 7.0, alpha: float = 1.702,
                     adapt=None):
    """sum over k of weights[t, k] * expert[experts[t, k]](x[t]) for gated-MLP experts, every
    pair computed: the T * K pairs grouped by expert, one grouped matmul per projection.
    matmul: the rows' layout and matmul (`jaxft.models.grouped_matmul.LAYOUTS`; None or "auto":
    the backend's, "blocks" on CPU, "gmm" (the Pallas kernel) on TPU, "ragged" (`jax.lax.ragged_dot`)
    elsewhere).
    biases: None, or (gate [X, F], up [X, F], down [X, E]) added to each row by its expert
    (gpt-oss). activation, limit, alpha: `jaxft.models.parts.gated`. adapt: None, or the
    experts' LoRA (`jaxft.models.lora.ExpertAdapters`): `adapt(name, rows, their base outputs,
    matmul, groups)` adds each row's expert's adapter, as grouped matmuls like the kernels'."""
    T, K = experts_TK.shape
    rows_of, grouped = grouped_matmul.layout(matmul)
    rows = rows_of(experts_TK, gate_XEF.shape[0])
    token_P = rows.pair_at // K  # T on a padding row: reads zeros, dropped when combined
    xs = jnp.take(x_TE, token_P, axis=0, mode="fill", fill_value=0)

    def adapted(name, x_P, y_P):  # a projection's outputs plus the rows' expert adapters
        return y_P if adapt is None else adapt(name, x_P, y_P, grouped, rows.groups)

    if grouped is grouped_matmul.block_matmul and biases is None and adapt is None and activation in ACTIVATIONS:
        # the whole MLP in one loop over the blocks (CPU)
        y = grouped_matmul.block_mlp(xs, gate_XEF, up_XEF, down_XFE, rows.groups, ACTIVATIONS[activation])
        return _combine(x_TE, y, weights_TK, rows.pair_at, token_P)
    # gate and up read the same rows: one grouped matmul of both kernels (one loop over blocks)
    gate_h, up_h = grouped(xs, (gate_XEF, up_XEF), rows.groups)
    gate_h, up_h = adapted("gate_proj", xs, gate_h), adapted("up_proj", xs, up_h)
    if biases is None and activation in ACTIVATIONS:
        h = ACTIVATIONS[activation](gate_h) * up_h
    else:
        if biases is not None:  # each row's expert's bias (0 for an expert past X: expert parallelism's padding)
            expert_P = jnp.take(experts_TK.reshape(-1), rows.pair_at, mode="fill", fill_value=0)
            gate_h = gate_h + jnp.take(biases[0], expert_P, axis=0, mode="fill", fill_value=0)
            up_h = up_h + jnp.take(biases[1], expert_P, axis=0, mode="fill", fill_value=0)
        h = gated(activation, gate_h, up_h, limit=limit, alpha=alpha)
    y = adapted("down_proj", h, grouped(h, down_XFE, rows.groups))
    if biases is not None:
        y = y + jnp.take(biases[2], expert_P, axis=0, mode="fill", fill_value=0)
    return _combine(x_TE, y, weights_TK, rows.pair_at, token_P)


def _combine(x_TE, y_PE, weights_TK, pair_at, token_P):
    """Each token's sum of its rows' outputs times their routing weights: [T, E]."""
    y_PE = y_PE * jnp.take(weights_TK.reshape(-1), pair_at, mode="fill", fill_value=0).astype(y_PE.dtype)[:, None]
    return jnp.zeros_like(x_TE).at[token_P].add(y_PE, mode="drop")


def router_stats(probs_TX, experts_TK, mask_T, logits_TX):
    """(picks [X], probs [X], z []): over the tokens where mask_T is set, how many of their k
    picks went to each expert, the sum of each expert's router probability, and the sum of
    logsumexp(router logits) ** 2. Per MoE layer they give `jaxft.losses.load_balancing_loss`,
    `jaxft.losses.router_z_loss` and the expert-load metrics."""
    X = probs_TX.shape[-1]
    mask = mask_T.astype(jnp.float32)[:, None]
    picks = jnp.sum(jnp.sum(jax.nn.one_hot(experts_TK, X, dtype=jnp.float32), axis=1) * mask, axis=0)
    z = jnp.sum(jax.nn.logsumexp(logits_TX.astype(jnp.float32), axis=-1) ** 2 * mask[:, 0])
    return picks, jnp.sum(probs_TX * mask, axis=0), z


class MoE(nnx.Module):
    """Router, `cfg.num_experts` gated-MLP experts (stacked kernels), optional shared expert.
    Called on [..., E] activations and a token mask (1 for real tokens, in the same order);
    returns (output of x's shape, `router_stats` over the masked tokens)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        E, X, F, pd = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.param_dtype
        # DeepSeek's router (and selection bias) stay float32 whatever the param dtype, as transformers keeps them
        self.router = _param(rngs, (E, X), ("embed", None), jnp.float32 if cfg.router_f32 else pd)
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
        if cfg.router_bias:  # DeepSeek-V3's e_score_correction_bias: a checkpoint constant, never trained
            self.e_score_correction_bias = _param(None, (X,), ("experts",), jnp.float32, init="zeros")
        if cfg.router_logit_bias:  # gpt-oss: the router's Linear bias, trained like its weight
            self.router_logit_bias = _param(None, (X,), ("experts",), pd, init="zeros")
        if cfg.expert_bias:  # gpt-oss: each expert's gate / up / down biases
            self.gate_bias = _param(None, (X, F), ("experts", "mlp"), pd, init="zeros")
            self.up_bias = _param(None, (X, F), ("experts", "mlp"), pd, init="zeros")
            self.down_bias = _param(None, (X, E), ("experts", "embed"), pd, init="zeros")
        self.logit_bias, self.expert_bias = cfg.router_logit_bias, cfg.expert_bias
        self.glu = (("limit", cfg.swiglu_limit), ("alpha", cfg.swiglu_alpha))
        self.k, self.normalize, self.activation = cfg.experts_per_token, cfg.norm_topk_prob, cfg.activation
        self.matmul = cfg.moe_matmul  # the grouped matmuls' layout (grouped_matmul.resolve)
        self.routing = (("scoring", cfg.router_scoring), ("groups", cfg.router_groups),
                        ("topk_groups", cfg.router_topk_groups), ("scale", cfg.routed_scaling_factor))
        self.router_f32, self.router_bias = cfg.router_f32, cfg.router_bias
        self.shared, self.shared_gated = bool(cfg.shared_expert_size), cfg.shared_expert_gate
        self.lora = cfg.lora  # adapters: one pair per routed expert (stacked), the shared expert's as dense ones
        lora.add_adapters(self, cfg, lora.MLP_PROJECTIONS, rngs, experts=True)
        if cfg.shared_expert_size:
            lora.add_adapters(self, cfg, tuple(lora.SHARED + n for n in lora.MLP_PROJECTIONS), rngs)

    def _shared(self, name, x, rng=None):
        """The shared expert's projection `name` ("gate", "up", "down") of x, with its adapter."""
        name = f"{lora.SHARED}{name}_proj"
        return lora.adapt(self, name, x, x @ kernel_value(getattr(self, name), x.dtype), self.lora, rng)

    def __call__(self, x, rng=None, token_mask=None):
        x_TE = x.reshape(-1, x.shape[-1])
        dtype = x_TE.dtype
        if self.router_f32:  # DeepSeek: routing decided in float32 whatever the compute dtype
            logits_TX = x_TE.astype(jnp.float32) @ kernel_value(self.router, jnp.float32)
        else:
            logits_TX = x_TE @ kernel_value(self.router, dtype)
        if self.logit_bias:
            logits_TX = logits_TX + self.router_logit_bias[...].astype(logits_TX.dtype)[None, :]
        bias_X = jax.lax.stop_gradient(self.e_score_correction_bias[...]) if self.router_bias else None
        weights_TK, experts_TK, probs_TX = route(logits_TX, self.k, normalize=self.normalize, bias_X=bias_X,
                                                 **dict(self.routing))
        mask_T = jnp.ones(x_TE.shape[:1], bool) if token_mask is None else token_mask.reshape(-1)
        experts = over_mesh(dropless_experts)  # split over the mesh's expert axis when it has one
        y_TE = experts(x_TE, weights_TK.astype(dtype), experts_TK, kernel_value(self.gate_proj, dtype),
                       kernel_value(self.up_proj, dtype), kernel_value(self.down_proj, dtype),
                       self.activation, self.matmul, biases=self._expert_biases(dtype), **dict(self.glu),
                       adapt=lora.expert_adapters(self, self.lora, rng))
        if self.shared:
            act, dense = ACTIVATIONS[self.activation], functools.partial(self._shared, rng=rng)
            shared_TE = dense("down", act(dense("gate", x_TE)) * dense("up", x_TE))
            if self.shared_gated:
                shared_TE = shared_TE * jax.nn.sigmoid(x_TE @ kernel_value(self.shared_expert_gate, dtype))
            y_TE = y_TE + shared_TE
        return y_TE.reshape(x.shape), router_stats(probs_TX, experts_TK, mask_T, logits_TX)

    def _expert_biases(self, dtype):
        if not self.expert_bias:
            return None
        return tuple(getattr(self, f"{n}_bias")[...].astype(dtype) for n in ("gate", "up", "down"))
