"""The Gated DeltaNet mixer (Qwen3.5's linear-attention layers) as a decoder part.

One layer, as transformers' Qwen3_5GatedDeltaNet: the input projected to the mixed q / k / v
channels (in_proj_qkv), the output gate z (in_proj_z), beta's and the decay's logits (in_proj_b,
in_proj_a); a depthwise causal conv1d with SiLU over the q / k / v channels; q and k
L2-normalised inside the recurrence (`jaxft.models.gated_deltanet`); beta = sigmoid(b), the
log-decay g = -exp(A_log) * softplus(a + dt_bias); the gated delta rule; a gated RMSNorm
(w * norm(o) * silu(z), w stored as itself, not an offset from 1) per value head; out_proj.

Packed rows: the conv and the recurrent state reset at every segment boundary, and a padding
position's input is zeroed first (transformers' apply_mask_to_padding_states), so left padding
in generation never reaches the state. Generation caches per layer the recurrent state
[B, Hv, Dk, Dv] (float32) and the conv window [B, K - 1, C]: a prefill runs the chunked rule,
a one-token decode step the step-by-step one.

Axis letters: B batch, L length, E embed, C conv channels (2 Hk Dk + Hv Dv), Hk / Hv key /
value heads, Dk / Dv their dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import gated_deltanet, linear_context_parallel, lora
from jaxft.models.parts import bcast, param as _param, rms_normalize
from jaxft.models.quantize import kernel_value

LINEAR_PROJECTIONS = lora.LINEAR_PROJECTIONS


def linear_dims(cfg) -> tuple[int, int, int, int, int, int]:
    """(Hk, Dk, Hv, Dv, C, K) of a model's Gated DeltaNet layers: heads and head dims, the conv
    channels and kernel width."""
    Hk, Dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    Hv, Dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    return Hk, Dk, Hv, Dv, 2 * Hk * Dk + Hv * Dv, cfg.linear_conv_kernel


def gated_rms_norm(x, gate, weight, eps: float):
    """transformers' Qwen3_5RMSNormGated: w * norm(x) (in x's dtype) * silu(gate) in float32,
    cast back to x's dtype."""
    normed = rms_normalize(x, eps).astype(x.dtype)
    out = bcast(weight.astype(x.dtype), normed) * normed
    return (out.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    """One linear-attention layer; call as `(x, segment_ids [B, L], cache, cache_index, rng) ->
    (out shaped as x, new cache or None)`; x [B, L, E] or its [B * L, E] token rows."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        E, pd = cfg.hidden_size, cfg.param_dtype
        Hk, Dk, Hv, Dv, C, K = linear_dims(cfg)
        self.cfg = cfg
        self.in_proj_qkv = _param(rngs, (E, C), ("embed", None), pd)
        self.in_proj_z = _param(rngs, (E, Hv * Dv), ("embed", None), pd)
        self.in_proj_b = _param(rngs, (E, Hv), ("embed", None), pd)
        self.in_proj_a = _param(rngs, (E, Hv), ("embed", None), pd)
        self.conv1d = _param(rngs, (K, C), (None, None), pd)  # transformers' [C, 1, K] transposed
        self.dt_bias = _param(None, (Hv,), (None,), pd, init="ones")
        # transformers draws A uniformly in [0.01, 16]; log(1..16) spread over the heads here
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, Hv, dtype=jnp.float32)).astype(pd),
                               logical_axes=(None,))
        self.norm_weight = _param(None, (Dv,), ("norm",), pd, init="ones")
        self.out_proj = _param(rngs, (Hv * Dv, E), (None, "embed"), pd)
        lora.add_adapters(self, cfg, LINEAR_PROJECTIONS, rngs)

    def _dense(self, name, x, rng):
        y = x @ kernel_value(getattr(self, name), x.dtype)
        return lora.adapt(self, name, x, y, self.cfg.lora, rng)

    def __call__(self, x, segment_ids_BL, cache=None, cache_index=None, rng=None):
        cfg = self.cfg
        B, L = segment_ids_BL.shape
        Hk, Dk, Hv, Dv, C, K = linear_dims(cfg)
        chunk_size = cfg.linear_chunk_size or gated_deltanet.DEFAULT_CHUNK
        x_BLE = x.reshape(B, L, -1)
        # padding (segment 0) contributes nothing to the conv or the state
        x_BLE = x_BLE * (segment_ids_BL > 0)[..., None].astype(x_BLE.dtype)
        qkv_BLC = self._dense("in_proj_qkv", x_BLE, rng)
        z_BLHV = self._dense("in_proj_z", x_BLE, rng).reshape(B, L, Hv, Dv)
        b_BLH = self._dense("in_proj_b", x_BLE, rng)
        a_BLH = self._dense("in_proj_a", x_BLE, rng)
        beta_BLH = jax.nn.sigmoid(b_BLH.astype(jnp.float32))
        A_H, dt_H = (bcast(w[...].astype(jnp.float32), a_BLH) for w in (self.A_log, self.dt_bias))
        g_BLH = -jnp.exp(A_H) * jax.nn.softplus(a_BLH.astype(jnp.float32) + dt_H)
        conv_WC = kernel_value(self.conv1d, qkv_BLC.dtype)
        new_window = new_state = None
        if cache is None and linear_context_parallel.applies(L):
            # Context parallelism (the mesh splits the tokens): each shard runs the conv and the
            # rule on its own tokens and the state is handed along (`linear_context_parallel`).
            out = linear_context_parallel.conv_and_rule(qkv_BLC, conv_WC, g_BLH, beta_BLH, segment_ids_BL,
                                                        key_heads=Hk, key_dim=Dk, value_dim=Dv,
                                                        chunk_size=chunk_size, recompute=cfg.remat != "none")
        else:
            window = None if cache is None else cache["conv"]
            qkv_BLC, new_window = gated_deltanet.causal_conv1d(qkv_BLC, conv_WC, segment_ids=segment_ids_BL,
                                                               window=window, activation="silu")
            q, k, v = jnp.split(qkv_BLC, [Hk * Dk, 2 * Hk * Dk], axis=-1)
            q, k, v = q.reshape(B, L, Hk, Dk), k.reshape(B, L, Hk, Dk), v.reshape(B, L, Hv, Dv)
            state = None if cache is None else cache["state"]
            if cache is not None and L == 1:  # a decode step: the recurrence itself
                out, new_state = gated_deltanet.gated_delta_rule_reference(
                    q, k, v, g_BLH, beta_BLH, segment_ids=segment_ids_BL, initial_state=state)
            else:
                out, new_state = gated_deltanet.gated_delta_rule(
                    q, k, v, g_BLH, beta_BLH, segment_ids=segment_ids_BL, initial_state=state, chunk_size=chunk_size)
        out = gated_rms_norm(out.astype(x_BLE.dtype), z_BLHV, self.norm_weight[...], cfg.rms_norm_eps)
        y_BLE = self._dense("out_proj", out.reshape(B, L, Hv * Dv), rng)
        new_cache = None
        if cache is not None:
            segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BL.astype(jnp.int32),
                                                    (0, cache_index))
            new_cache = {"state": new_state.astype(cache["state"].dtype),
                         "conv": new_window.astype(cache["conv"].dtype), "segment_ids": segments}
        return y_BLE.reshape(x.shape), new_cache
