"""One Flax NNX decoder for the Llama, Mistral, Qwen2 and Qwen3 families.

Axis letters used in names and einsums throughout jaxft:
  B batch, L query length, S key length (cache), E embed, H query heads, K key/value heads,
  G query heads per kv head (H = K * G), D head dim, F mlp hidden, V vocab.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `jaxft.parallel.sharding`
maps those names to mesh axes in one table, so no mesh axis name appears here.
Numerics follow transformers' PyTorch implementation: RMSNorm and softmax in float32,
rotate-half RoPE, SwiGLU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models import lora
from jaxft.models.attention import attend
from jaxft.models.config import ModelConfig
from jaxft.models.quantize import kernel_value
from jaxft.models.remat import REMAT_POLICIES, remat
from jaxft.parallel.sharding import constrain, splits

_INIT_STD = 0.02  # transformers' default initializer_range


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _bcast(w: jax.Array, x: jax.Array) -> jax.Array:
    """Leading unit axes so `w` (trailing dims of x) broadcasts without rank promotion."""
    return w.reshape((1,) * (x.ndim - w.ndim) + w.shape)


def _act(x: jax.Array, last: str) -> tuple[str, ...]:
    """Logical axes of an activation: [B, L, last] or [N, last] token rows (`_token_rows`)."""
    return ("act_tokens", last) if x.ndim == 2 else ("act_batch", "act_length", last)


def _token_rows(x_BLE: jax.Array) -> jax.Array:
    """[B, L, E] as [B * L, E] token rows, unless the mesh splits the token axis (context
    parallelism keeps [B, L, E]). Dense layers then contract one token axis: XLA:CPU runs the
    weight gradients of a two-axis (B, L) contraction through transposed copies, at about
    half the speed; the merged axis is sharded as the batch is, so elsewhere it is a no-op."""
    if splits("act_length"):
        return x_BLE
    return x_BLE.reshape(-1, x_BLE.shape[-1])


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[D/2] float32 inverse frequencies, with llama3 / linear scaling applied."""
    dim = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: leave high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding at explicit positions (restarting per packed example)."""
    angles = positions_BL[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x_BLHD.dtype), jnp.sin(angles).astype(x_BLHD.dtype)
    x1, x2 = jnp.split(x_BLHD, 2, axis=-1)
    return x_BLHD * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, axis: str = "norm"):
        self.weight = _param(None, (dim,), (axis,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _bcast(self.weight[...].astype(x.dtype), x) * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention that never crosses packed-segment boundaries."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, H, K, D, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.param_dtype
        self.cfg = cfg
        self.q_proj = _param(rngs, (E, H, D), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (H, D, E), ("q_heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = _param(None, (H, D), ("q_heads", "head_dim"), pd, init="zeros")
            self.k_bias = _param(None, (K, D), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = _param(None, (K, D), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(None, (E,), ("norm",), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim")
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim")
        lora.add_adapters(self, cfg, lora.ATTENTION_PROJECTIONS, rngs)

    def _project(self, x_BLE, name, rng=None):
        kernel = kernel_value(getattr(self, f"{name}_proj"), x_BLE.dtype)
        y = lora.adapt(self, f"{name}_proj", x_BLE, jnp.einsum("...E,EHD->...HD", x_BLE, kernel), self.cfg.lora, rng)
        if self.cfg.qkv_bias:
            y = y + _bcast(getattr(self, f"{name}_bias")[...].astype(y.dtype), y)
        return y

    def __call__(self, x_BLE, positions_BL, segment_ids_BL, cache=None, cache_index=None, rng=None):
        """x_BLE: [B, L, E], or [B * L, E] token rows (`_token_rows`); the result is shaped as x."""
        cfg = self.cfg
        B, L = positions_BL.shape
        q_BLHD, k_BLKD, v_BLKD = (self._project(x_BLE, n, rng).reshape(B, L, -1, cfg.dim_per_head)
                                  for n in ("q", "k", "v"))
        if cfg.qk_norm:
            q_BLHD, k_BLKD = self.q_norm(q_BLHD), self.k_norm(k_BLKD)
        inv_freq = rope_inv_freq(cfg)
        q_BLHD = apply_rope(q_BLHD, positions_BL, inv_freq)
        k_BLKD = apply_rope(k_BLKD, positions_BL, inv_freq)
        q_BLHD = constrain(q_BLHD, ("act_batch", "act_length", "act_heads", None))

        if cache is None:
            k_BSKD, v_BSKD, kv_segments_BS, q_offset = k_BLKD, v_BLKD, segment_ids_BL, 0
            new_cache = None
        else:
            # Decode / prefill: write this chunk's keys at `cache_index`, attend over the cache.
            start = (0, cache_index, 0, 0)
            k_BSKD = jax.lax.dynamic_update_slice(cache["k"], k_BLKD.astype(cache["k"].dtype), start)
            v_BSKD = jax.lax.dynamic_update_slice(cache["v"], v_BLKD.astype(cache["v"].dtype), start)
            kv_segments_BS = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids_BL.astype(jnp.int32), (0, cache_index)
            )
            new_cache = {"k": k_BSKD, "v": v_BSKD, "segment_ids": kv_segments_BS}
            q_offset = cache_index

        # Causal within a row, never across packed segments or onto padding (models/attention.py).
        out_BLHD = attend(q_BLHD, k_BSKD, v_BSKD.astype(q_BLHD.dtype), q_segment_ids_BL=segment_ids_BL,
                          kv_segment_ids_BS=kv_segments_BS, q_offset=q_offset,
                          sliding_window=cfg.sliding_window, implementation=cfg.attention).astype(x_BLE.dtype)
        out_BLHD = out_BLHD.reshape(x_BLE.shape[:-1] + out_BLHD.shape[-2:])
        y_BLE = jnp.einsum("...HD,HDE->...E", out_BLHD, kernel_value(self.o_proj, x_BLE.dtype))
        y_BLE = lora.adapt(self, "o_proj", out_BLHD, y_BLE, cfg.lora, rng)
        if cfg.o_bias:
            y_BLE = y_BLE + _bcast(self.o_bias[...].astype(y_BLE.dtype), y_BLE)
        return y_BLE, new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, F, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = _param(rngs, (E, F), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (E, F), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (F, E), ("mlp", "embed"), pd)
        if cfg.mlp_bias:
            self.gate_bias = _param(None, (F,), ("mlp",), pd, init="zeros")
            self.up_bias = _param(None, (F,), ("mlp",), pd, init="zeros")
            self.down_bias = _param(None, (E,), ("norm",), pd, init="zeros")
        self.has_bias = cfg.mlp_bias
        self.lora = cfg.lora
        lora.add_adapters(self, cfg, lora.MLP_PROJECTIONS, rngs)

    def _dense(self, x, name, rng=None):
        kernel = kernel_value(getattr(self, f"{name}_proj"), x.dtype)
        y = lora.adapt(self, f"{name}_proj", x, x @ kernel, self.lora, rng)
        if not self.has_bias:
            return y
        return y + _bcast(getattr(self, f"{name}_bias")[...].astype(y.dtype), y)

    def __call__(self, x_BLE, rng=None):
        h_BLF = jax.nn.silu(self._dense(x_BLE, "gate", rng)) * self._dense(x_BLE, "up", rng)
        h_BLF = constrain(h_BLF, _act(h_BLF, "act_mlp"))
        return self._dense(h_BLF, "down", rng)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype
        )
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BLE, positions_BL, segment_ids_BL, cache=None, cache_index=None, rng=None):
        """rng: this layer's LoRA dropout key (training with lora.dropout > 0), else None."""
        x = _token_rows(x_BLE)
        attn, new_cache = self.self_attn(self.input_layernorm(x), positions_BL, segment_ids_BL, cache, cache_index, rng)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), rng)
        return constrain(x.reshape(x_BLE.shape), ("act_batch", "act_length", "act_embed")), new_cache


def _run_layer(layer, x, positions, segment_ids, rng=None):
    return layer(x, positions, segment_ids, rng=rng)[0]


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs):
    """`cfg.num_layers` DecoderLayers as one module whose params have a leading "layers" axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return DecoderLayer(cfg, rngs=rngs)

    layers = make(rngs)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable) and node.has_metadata("logical_axes"):
            node.set_metadata(logical_axes=("layers",) + tuple(node.get_metadata()["logical_axes"]))
    return layers


class Decoder(nnx.Module):
    """Decoder-only language model: `model(tokens, positions=None, segment_ids=None) -> logits [B, L, V]`.

    With `cfg.scan_layers` (the default) the layers are one stacked module run by `lax.scan`,
    so compile time does not grow with depth; otherwise a list run one after another. Both
    hold the same numbers (HF checkpoints load into either) and give the same logits.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        if cfg.scan_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def _run_scanned(self, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng=None):
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:
            def body(x, xs):
                layer_state, key = xs
                return nnx.merge(graphdef, layer_state)(x, positions_BL, segment_ids_BL, rng=key)[0], None

            keys = None if rng is None else jax.random.split(rng, self.cfg.num_layers)
            x_BLE, _ = jax.lax.scan(remat(body, self.cfg.remat), x_BLE, (stacked, keys))
            return x_BLE, None

        def step(x, xs):
            layer_state, k, v = xs
            layer_cache = {"k": k, "v": v, "segment_ids": cache["segment_ids"]}
            x, c = nnx.merge(graphdef, layer_state)(x, positions_BL, segment_ids_BL, layer_cache, cache_index)
            return x, (c["k"], c["v"], c["segment_ids"])

        x_BLE, (k, v, segments) = jax.lax.scan(step, x_BLE, (stacked, cache["k"], cache["v"]))
        return x_BLE, {"k": k, "v": v, "segment_ids": segments[0]}

    def _run_unrolled(self, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng=None):
        if cache is None:
            run = _run_layer
            if self.cfg.remat != "none":
                run = nnx.remat(_run_layer, policy=REMAT_POLICIES[self.cfg.remat])
            keys = [None] * self.cfg.num_layers if rng is None else list(jax.random.split(rng, self.cfg.num_layers))
            for layer, key in zip(self.layers, keys):
                x_BLE = run(layer, x_BLE, positions_BL, segment_ids_BL, key)
            return x_BLE, None
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = {"k": cache["k"][i], "v": cache["v"][i], "segment_ids": cache["segment_ids"]}
            x_BLE, c = layer(x_BLE, positions_BL, segment_ids_BL, layer_cache, cache_index)
            new_layers.append(c)
        return x_BLE, {"k": [c["k"] for c in new_layers], "v": [c["v"] for c in new_layers],
                       "segment_ids": new_layers[0]["segment_ids"]}

    def lm_head_kernel(self) -> jax.Array:
        """[E, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        return_hidden: bool = False,
        dropout_rng: jax.Array | None = None,
    ):
        """Runs the decoder: `model(tokens, positions=None, segment_ids=None) -> logits`.

        tokens: [B, L] int token ids. positions: [B, L] (default 0..L-1; restart them per
        packed example). segment_ids: [B, L] (default all 1; 0 = padding; tokens attend only
        within their segment). cache / cache_index: a KV cache from `init_cache` and the slot
        where this chunk starts; then the result is `(out, new_cache)`.
        Returns logits [B, L, V] in float32, or the final normed hidden states [B, L, E]
        when `return_hidden` (for chunked cross-entropy against `lm_head_kernel()`).
        dropout_rng: a key for LoRA dropout (cfg.lora.dropout > 0; training only), else None.
        """
        cfg = self.cfg
        tokens_BL = tokens
        B, L = tokens_BL.shape
        positions_BL = (jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)) if positions is None
                        else positions)
        segment_ids_BL = jnp.ones((B, L), jnp.int32) if segment_ids is None else segment_ids
        x_BLE = jnp.take(self.embed_tokens[...], tokens_BL, axis=0).astype(cfg.compute_dtype)
        x_BLE = constrain(x_BLE, ("act_batch", "act_length", "act_embed"))
        run = self._run_scanned if cfg.scan_layers else self._run_unrolled
        use_dropout = dropout_rng is not None and cache is None and cfg.lora is not None and cfg.lora.dropout > 0
        x_BLE, new_cache = run(x_BLE, positions_BL, segment_ids_BL, cache, cache_index,
                               dropout_rng if use_dropout else None)
        out = self.norm(x_BLE)
        if not return_hidden:
            # f32 accumulation and output: bf16 logits would round the softmax's inputs.
            out = jnp.einsum("...E,EV->...V", _token_rows(out), self.lm_head_kernel().astype(out.dtype),
                             preferred_element_type=jnp.float32).reshape(B, L, -1)
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            return out
        return out, new_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache: k / v [B, S, K, D] per layer (stacked [N, B, S, K, D] for a scanned
    model, a list of N otherwise), and key segment ids [B, S] (0 = empty)."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch_size, max_length, cfg.num_kv_heads, cfg.dim_per_head)
    if cfg.scan_layers:
        kv = {"k": jnp.zeros((cfg.num_layers,) + shape, dtype), "v": jnp.zeros((cfg.num_layers,) + shape, dtype)}
    else:
        kv = {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
              "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]}
    return {**kv, "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32)}
