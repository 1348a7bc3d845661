"""One Flax NNX decoder assembled from parts: every family jaxft loads (Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3, Phi-3 / Phi-4) is a `ModelConfig`, not a file of code.

Axis letters used in names and einsums throughout jaxft:
  B batch, L query length, S key length (cache), E embed, H query heads, K key/value heads,
  G query heads per kv head (H = K * G), D head dim, F mlp hidden, V vocab.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `jaxft.parallel.sharding`
maps those names to mesh axes in one table, so no mesh axis name appears here.
Numerics follow transformers' PyTorch implementation: norms and softmax in float32,
rotate-half RoPE, gated MLPs (SwiGLU / GeGLU).

Layers that differ by position (Gemma's sliding and global layers, each with its window and
RoPE: `ModelConfig.layer_kinds`) share one parameter layout, so the stack stays one `lax.scan`
over all layers (compile time independent of depth, any pattern, no remainder layers): each
layer's kind is an int carried with its parameters, and attention switches (`lax.switch`) to
that kind's window and RoPE. An unrolled model passes the kind statically.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from jaxft.models import layer_groups, lora
from jaxft.models.attention import attend
from jaxft.models.config import LayerKind, LayerSpec, ModelConfig
from jaxft.models.linear_attention import GatedDeltaNet
from jaxft.models.mla import MLA
from jaxft.models.moe import MoE
from jaxft.models.parts import ACTIVATIONS, RMSNorm, bcast as _bcast, param as _param, rms_normalize, soft_cap
from jaxft.models.quantize import kernel_value
from jaxft.models.remat import REMAT_POLICIES, remat
from jaxft.models.rope import apply_rope
from jaxft.parallel.sharding import constrain, splits


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


class Attention(nnx.Module):
    """Grouped-query causal self-attention that never crosses packed-segment boundaries.

    spec (Gemma 4; `cfg` is then the layer's own `ModelConfig.layer_config`): a layer whose
    values are its keys' projection has no v_proj; a layer reading an earlier layer's keys and
    values (`spec.kv_from`) has neither k_proj nor v_proj."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, spec: LayerSpec | None = None):
        E, H, K, D, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.param_dtype
        self.cfg = cfg
        self.spec = spec
        self.projections = ("q", "k", "v") if spec is None else spec.projections
        # Qwen3.5 (attn_output_gate): each head's query and then its output gate, as q_proj's rows
        self.q_proj = _param(rngs, (E, H, 2 * D if cfg.attn_output_gate else D), ("embed", "q_heads", "head_dim"), pd)
        if "k" in self.projections:
            self.k_proj = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), pd)
        if "v" in self.projections:
            self.v_proj = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (H, D, E), ("q_heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            for name in self.projections:
                heads = ("q_heads", H) if name == "q" else ("kv_heads", K)
                setattr(self, f"{name}_bias", _param(None, (heads[1], D), (heads[0], "head_dim"), pd, init="zeros"))
        if cfg.o_bias:
            self.o_bias = _param(None, (E,), ("norm",), pd, init="zeros")
        if cfg.attention_sinks:  # gpt-oss: each head's sink logit (`jaxft.models.attention`)
            self.sinks = _param(None, (H,), ("q_heads",), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim", kind=cfg.norm)
            if "k" in self.projections:
                self.k_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim", kind=cfg.norm)
        names = tuple(n for n in lora.ATTENTION_PROJECTIONS if n[0] in self.projections or n == "o_proj")
        lora.add_adapters(self, cfg, names, rngs)

    def _kernel(self, name, dtype):
        """A projection's kernel in the compute dtype; on the TPU path (splash attention) pinned
        to row-major memory order: left free, XLA keeps transposed copies of the whole layer
        stack's f32 attention kernels alive across the layer loop (Llama-3-8B, v5p-8, 8k tokens:
        1.25 GiB per chip). Other backends' programs are unchanged."""
        kernel = kernel_value(getattr(self, f"{name}_proj"), dtype)
        if self.cfg.attention != "splash":
            return kernel
        return with_layout_constraint(kernel, Layout(major_to_minor=tuple(range(kernel.ndim))))

    def _project(self, x_BLE, name, rng=None):
        kernel = self._kernel(name, x_BLE.dtype)
        y = lora.adapt(self, f"{name}_proj", x_BLE, jnp.einsum("...E,EHD->...HD", x_BLE, kernel), self.cfg.lora, rng)
        if self.cfg.qkv_bias:
            y = y + _bcast(getattr(self, f"{name}_bias")[...].astype(y.dtype), y)
        return y

    def __call__(self, x_BLE, positions_BL, segment_ids_BL, cache=None, cache_index=None, rng=None, kind=0,
                 shared_kv=None):
        """x_BLE: [B, L, E], or [B * L, E] token rows (`_token_rows`); the result is shaped as x.
        kind: this layer's index into `cfg.layer_kinds()` (a traced int in a scanned stack).
        shared_kv: (keys, values, key segment ids) of the layer this one reads (`spec.kv_from`).
        Returns (out, new cache, this layer's (keys, values, key segment ids) after RoPE)."""
        cfg = self.cfg
        B, L = positions_BL.shape
        D = cfg.dim_per_head
        q_BLHD = self._project(x_BLE, "q", rng).reshape(B, L, -1, 2 * D if cfg.attn_output_gate else D)
        if cfg.attn_output_gate:
            q_BLHD, gate_BLHD = jnp.split(q_BLHD, 2, axis=-1)
        k_BLKD = v_BLKD = None
        if "k" in self.projections:
            k_BLKD = self._project(x_BLE, "k", rng).reshape(B, L, -1, D)
            v_BLKD = self._project(x_BLE, "v", rng).reshape(B, L, -1, D) if "v" in self.projections else k_BLKD
            if cfg.v_norm:  # Gemma 4: values RMS-normed without a scale
                v_BLKD = rms_normalize(v_BLKD, cfg.rms_norm_eps).astype(v_BLKD.dtype)
        if cfg.qk_norm:
            q_BLHD = self.q_norm(q_BLHD)
            k_BLKD = None if k_BLKD is None else self.k_norm(k_BLKD)
        if cfg.query_pre_attn_scalar:  # Gemma: scores scaled by qpas ** -0.5; attend scales by D ** -0.5
            q_BLHD = q_BLHD * jnp.asarray(math.sqrt(D / cfg.query_pre_attn_scalar), q_BLHD.dtype)
        kinds = cfg.layer_kinds()[0]
        core = functools.partial(_attention_core, cfg, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                                 cache=cache, cache_index=cache_index,
                                 sinks_H=self.sinks[...] if cfg.attention_sinks else None)
        if isinstance(kind, int) or len(kinds) == 1:
            out_BLHD, new_cache, kv = core(kinds[kind if isinstance(kind, int) else 0], q_BLHD, k_BLKD, v_BLKD,
                                           shared_kv=shared_kv)
        else:  # a scanned stack of mixed layers: this layer's window and RoPE
            branches = [lambda q, k, v, kind=k: core(kind, q, k, v)[:2] for k in kinds]
            (out_BLHD, new_cache), kv = jax.lax.switch(kind, branches, q_BLHD, k_BLKD, v_BLKD), None
        out_BLHD = out_BLHD.astype(x_BLE.dtype)
        if cfg.attn_output_gate:
            out_BLHD = out_BLHD * jax.nn.sigmoid(gate_BLHD)
        out_BLHD = out_BLHD.reshape(x_BLE.shape[:-1] + out_BLHD.shape[-2:])
        if cache is None:
            y_BLE = jnp.einsum("...HD,HDE->...E", out_BLHD, self._kernel("o", x_BLE.dtype))
        else:  # (H, D) contracted in this order: einsum lists them as (D, H), for which XLA:CPU
            # copies the o_proj kernel transposed on every call (every layer of every decode step);
            # training keeps einsum's program (its rounding, which tests compare to tolerances)
            n = out_BLHD.ndim
            y_BLE = jax.lax.dot_general(out_BLHD, self._kernel("o", x_BLE.dtype), (((n - 2, n - 1), (0, 1)), ((), ())))
        y_BLE = lora.adapt(self, "o_proj", out_BLHD, y_BLE, cfg.lora, rng)
        if cfg.o_bias:
            y_BLE = y_BLE + _bcast(self.o_bias[...].astype(y_BLE.dtype), y_BLE)
        return y_BLE, new_cache, kv


def _attention_core(cfg: ModelConfig, kind: LayerKind, q_BLHD, k_BLKD, v_BLKD, *, positions_BL,
                    segment_ids_BL, cache, cache_index, shared_kv=None, sinks_H=None):
    """RoPE, the KV-cache write and the attention of one layer kind: (out [B, L, H, D], cache,
    (keys, values, key segment ids) attended). With `shared_kv` those are an earlier layer's
    (Gemma 4's KV sharing) and k / v / cache are unused."""
    q_BLHD = apply_rope(q_BLHD, positions_BL, kind.rope)
    if shared_kv is None:
        k_BLKD = apply_rope(k_BLKD, positions_BL, kind.rope)
    q_BLHD = constrain(q_BLHD, ("act_batch", "act_length", "act_heads", None))
    if shared_kv is not None:
        (k_BSKD, v_BSKD, kv_segments_BS), new_cache = shared_kv, None
        q_offset = 0 if cache_index is None else cache_index
    elif cache is None:
        k_BSKD, v_BSKD, kv_segments_BS, q_offset = k_BLKD, v_BLKD, segment_ids_BL, 0
        new_cache = None
    else:
        # Decode / prefill: write this chunk's keys at `cache_index`, attend over the cache. The
        # cache is heads-major, [B, K, S, D]: a decode step's dots read it as it lies (attend's
        # one-query path transposes back what it is given here, which XLA cancels).
        start = (0, 0, cache_index, 0)
        k_BKSD = jax.lax.dynamic_update_slice(cache["k"], jnp.swapaxes(k_BLKD, 1, 2).astype(cache["k"].dtype), start)
        v_BKSD = jax.lax.dynamic_update_slice(cache["v"], jnp.swapaxes(v_BLKD, 1, 2).astype(cache["v"].dtype), start)
        kv_segments_BS = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids_BL.astype(jnp.int32), (0, cache_index)
        )
        new_cache = {"k": k_BKSD, "v": v_BKSD, "segment_ids": kv_segments_BS}
        k_BSKD, v_BSKD = jnp.swapaxes(k_BKSD, 1, 2), jnp.swapaxes(v_BKSD, 1, 2)
        q_offset = cache_index
    # Causal within a row, never across packed segments or onto padding (models/attention.py).
    out_BLHD = attend(q_BLHD, k_BSKD, v_BSKD.astype(q_BLHD.dtype), q_segment_ids_BL=segment_ids_BL,
                      kv_segment_ids_BS=kv_segments_BS, q_offset=q_offset, sliding_window=kind.window,
                      implementation=cfg.attention, logit_softcap=cfg.attn_logit_softcap, sinks_H=sinks_H)
    return out_BLHD, new_cache, (k_BSKD, v_BSKD, kv_segments_BS)


class MLP(nnx.Module):
    """A gated MLP: down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-GELU (GeGLU)."""

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
        self.activation = cfg.activation
        self.lora = cfg.lora
        lora.add_adapters(self, cfg, lora.MLP_PROJECTIONS, rngs)

    def _dense(self, x, name, rng=None):
        kernel = kernel_value(getattr(self, f"{name}_proj"), x.dtype)
        y = lora.adapt(self, f"{name}_proj", x, x @ kernel, self.lora, rng)
        if not self.has_bias:
            return y
        return y + _bcast(getattr(self, f"{name}_bias")[...].astype(y.dtype), y)

    def __call__(self, x_BLE, rng=None):
        h_BLF = ACTIVATIONS[self.activation](self._dense(x_BLE, "gate", rng)) * self._dense(x_BLE, "up", rng)
        h_BLF = constrain(h_BLF, _act(h_BLF, "act_mlp"))
        return self._dense(h_BLF, "down", rng)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks with residuals; with `cfg.sandwich_norms` (Gemma) each
    block's output is normed too before the residual add. Norm names are the checkpoints': in
    a sandwich, post_attention_layernorm norms the attention's output, otherwise the MLP's input.
    Gemma 4 adds a per-layer input block (`cfg.per_layer_input_size`: gate, times this layer's
    per-layer input, projected back and normed, added) and a stored scalar on the output; a
    `spec` gives this layer its own shape (`ModelConfig.layer_specs`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, spec: LayerSpec | None = None):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, kind=cfg.norm)

        layer_cfg = cfg if spec is None else cfg.layer_config(spec)
        self.input_layernorm = norm()
        self.linear = spec is not None and spec.linear
        if self.linear:  # Qwen3.5's Gated DeltaNet layers
            self.linear_attn = GatedDeltaNet(layer_cfg, rngs=rngs)
        else:  # Multi-head latent attention (DeepSeek) where the config has a latent rank
            self.self_attn = (MLA(layer_cfg, rngs=rngs) if cfg.kv_lora_rank is not None
                              else Attention(layer_cfg, rngs=rngs, spec=spec))
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        self.moe = spec.moe if spec is not None else cfg.num_experts > 0
        self.mlp = MoE(layer_cfg, rngs=rngs) if self.moe else MLP(layer_cfg, rngs=rngs)
        self.per_layer_input_size = cfg.per_layer_input_size
        if cfg.per_layer_input_size:
            E, P, pd = cfg.hidden_size, cfg.per_layer_input_size, cfg.param_dtype
            self.per_layer_input_gate = _param(rngs, (E, P), ("embed", "per_layer"), pd)
            self.per_layer_projection = _param(rngs, (P, E), ("per_layer", "embed"), pd)
            self.post_per_layer_input_norm = norm()
            self.activation = cfg.activation
        if cfg.layer_scalar:  # a checkpoint constant (a buffer in transformers): never trained
            self.layer_scalar = _param(None, (1,), ("norm",), cfg.param_dtype, init="ones")
        self.scaled = cfg.layer_scalar

    def __call__(self, x_BLE, positions_BL, segment_ids_BL, cache=None, cache_index=None, rng=None, kind=0,
                 shared_kv=None, per_layer_input=None):
        """rng: this layer's LoRA dropout key (training with lora.dropout > 0), else None.
        kind: this layer's index into `cfg.layer_kinds()`. shared_kv: the keys and values this
        layer reads (`LayerSpec.kv_from`); per_layer_input: [B, L, P] (Gemma 4's PLE).
        Returns (out, new cache, this layer's (keys, values, key segment ids), its router stats
        (`jaxft.models.moe.router_stats`; None without experts))."""
        x = _token_rows(x_BLE)
        if self.linear:
            (attn, new_cache), kv = self.linear_attn(self.input_layernorm(x), segment_ids_BL, cache, cache_index,
                                                     rng), None
        else:
            attn, new_cache, kv = self.self_attn(self.input_layernorm(x), positions_BL, segment_ids_BL, cache,
                                                 cache_index, rng, kind, shared_kv=shared_kv)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            h = self.pre_feedforward_layernorm(x)
        else:
            x = x + attn
            h = self.post_attention_layernorm(x)
        router = None
        if self.moe:  # a mixture of experts also reports its routing over the real tokens
            h, router = self.mlp(h, rng, segment_ids_BL > 0)
        else:
            h = self.mlp(h, rng)
        x = x + (self.post_feedforward_layernorm(h) if self.sandwich else h)
        if self.per_layer_input_size:
            gate = ACTIVATIONS[self.activation](x @ kernel_value(self.per_layer_input_gate, x.dtype))
            gate = gate * per_layer_input.reshape(gate.shape).astype(gate.dtype)
            x = x + self.post_per_layer_input_norm(gate @ kernel_value(self.per_layer_projection, x.dtype))
        if self.scaled:
            x = x * _bcast(jax.lax.stop_gradient(self.layer_scalar[...]).astype(x.dtype), x)
        return constrain(x.reshape(x_BLE.shape), ("act_batch", "act_length", "act_embed")), new_cache, kv, router


def _layer_runner(kind: int):
    """A layer call with its kind fixed (a closure: nnx.remat takes positional arguments only):
    (x, router stats or None)."""
    def run(layer, x, positions, segment_ids, rng=None):
        out = layer(x, positions, segment_ids, rng=rng, kind=kind)
        return out[0], out[3]
    return run


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs, spec: LayerSpec | None = None, count: int | None = None):
    """`count` (default `cfg.num_layers`) DecoderLayers as one module whose params have a
    leading "layers" axis; `spec`: their shape (`ModelConfig.layer_specs`)."""

    @nnx.split_rngs(splits=count or cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return DecoderLayer(cfg, rngs=rngs, spec=spec)

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
        specs = cfg.layer_specs()
        if specs is not None and cfg.scan_layers:  # Gemma 4: a stack per position of each LayerGroup
            self.groups = nnx.List([nnx.List([_stacked_layers(cfg, rngs, specs[g.layer(0, j)], g.repeats)
                                              for j in range(g.period)]) for g in cfg.layer_groups()])
        elif cfg.scan_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, spec=None if specs is None else specs[i])
                                    for i in range(cfg.num_layers)])
        if cfg.per_layer_input_size:  # Gemma 4's per-layer inputs: a token table and a projection
            N, P, pd = cfg.num_layers, cfg.per_layer_input_size, cfg.param_dtype
            self.embed_tokens_per_layer = _param(rngs, (cfg.per_layer_vocab_size or cfg.vocab_size, N * P),
                                                 ("vocab", "per_layer"), pd)
            self.per_layer_model_projection = _param(rngs, (cfg.hidden_size, N * P), ("embed", "per_layer"), pd)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps, param_dtype=pd, kind=cfg.norm)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, kind=cfg.norm)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def _kinds_N(self):
        """Each layer's kind as scan input, or None when every layer is alike (no switch)."""
        kinds, index = self.cfg.layer_kinds()
        return None if len(kinds) == 1 else jnp.asarray(index, jnp.int32)

    def _run_scanned(self, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng=None):
        graphdef, stacked = nnx.split(self.layers)
        kinds_N = self._kinds_N()
        if cache is None:
            def body(x, xs):
                layer_state, key, kind = xs
                layer = nnx.merge(graphdef, layer_state)
                out = layer(x, positions_BL, segment_ids_BL, rng=key, kind=0 if kind is None else kind)
                return out[0], out[3]  # router stats: None without experts

            keys = None if rng is None else jax.random.split(rng, self.cfg.num_layers)
            x_BLE, router_N = jax.lax.scan(remat(body, self.cfg.remat), x_BLE, (stacked, keys, kinds_N))
            return x_BLE, None, router_N

        names = layer_groups.cache_names(self.cfg)  # each layer's cached arrays (k, v; MLA: latent, k_rope)

        def step(x, xs):
            layer_state, arrays, kind = xs
            layer_cache = {**dict(zip(names, arrays)), "segment_ids": cache["segment_ids"]}
            x, c, _, _ = nnx.merge(graphdef, layer_state)(x, positions_BL, segment_ids_BL, layer_cache,
                                                          cache_index, kind=0 if kind is None else kind)
            return x, (tuple(c[n] for n in names), c["segment_ids"])

        x_BLE, (arrays, segments) = jax.lax.scan(step, x_BLE, (stacked, tuple(cache[n] for n in names), kinds_N))
        return x_BLE, {**dict(zip(names, arrays)), "segment_ids": segments[0]}, None

    def _run_unrolled(self, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng=None, per_layer_BLNP=None):
        kind_of = self.cfg.layer_kinds()[1]  # static per layer: no switch
        specs = self.cfg.layer_specs()
        if cache is None and specs is None:
            keys = [None] * self.cfg.num_layers if rng is None else list(jax.random.split(rng, self.cfg.num_layers))
            runners = {kind: _layer_runner(kind) for kind in set(kind_of)}
            if self.cfg.remat != "none":
                runners = {k: nnx.remat(run, policy=REMAT_POLICIES[self.cfg.remat]) for k, run in runners.items()}
            routers = []
            for layer, key, kind in zip(self.layers, keys, kind_of):
                x_BLE, router = runners[kind](layer, x_BLE, positions_BL, segment_ids_BL, key)
                routers.append(router)
            return x_BLE, None, layer_groups.stack_router(routers)
        if specs is not None:  # Gemma 4: per-layer shapes, shared keys and values, per-layer inputs
            return layer_groups.run_unrolled(self.cfg, self.layers, x_BLE, positions_BL, segment_ids_BL, cache,
                                             cache_index, rng, per_layer_BLNP)
        new_layers, names = [], layer_groups.cache_names(self.cfg)
        for i, layer in enumerate(self.layers):
            layer_cache = {**{n: cache[n][i] for n in names}, "segment_ids": cache["segment_ids"]}
            x_BLE, c, _, _ = layer(x_BLE, positions_BL, segment_ids_BL, layer_cache, cache_index, kind=kind_of[i])
            new_layers.append(c)
        return x_BLE, {**{n: [c[n] for c in new_layers] for n in names},
                       "segment_ids": new_layers[0]["segment_ids"]}, None

    def _per_layer_inputs(self, tokens_BL, x_BLE):
        """Gemma 4's per-layer inputs [B, L, N, P]: each token's row of the per-layer table
        (times sqrt(P)) plus the normed projection of its embedding (times 1 / sqrt(E)), over sqrt(2)."""
        cfg = self.cfg
        (B, L), N, P, dtype = tokens_BL.shape, cfg.num_layers, cfg.per_layer_input_size, x_BLE.dtype
        table_BLNP = jnp.take(self.embed_tokens_per_layer[...], tokens_BL, axis=0).astype(dtype).reshape(B, L, N, P)
        table_BLNP = table_BLNP * jnp.asarray(math.sqrt(P), dtype)
        proj_BLNP = jnp.einsum("BLE,EM->BLM", x_BLE, kernel_value(self.per_layer_model_projection, dtype))
        proj_BLNP = self.per_layer_projection_norm(
            (proj_BLNP * jnp.asarray(cfg.hidden_size ** -0.5, dtype)).reshape(B, L, N, P))
        return (proj_BLNP + table_BLNP) * jnp.asarray(2 ** -0.5, dtype)

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
        return_router_stats: bool = False,
    ):
        """Runs the decoder: `model(tokens, positions=None, segment_ids=None) -> logits`.

        tokens: [B, L] int token ids. positions: [B, L] (default 0..L-1; restart them per
        packed example). segment_ids: [B, L] (default all 1; 0 = padding; tokens attend only
        within their segment). cache / cache_index: a KV cache from `init_cache` and the slot
        where this chunk starts; then the result is `(out, new_cache)`.
        Returns logits [B, L, V] in float32 (soft-capped where the family caps them), or the
        final normed hidden states [B, L, E] when `return_hidden` (for chunked cross-entropy
        against `lm_head_kernel()`, with `cfg.final_logit_softcap`).
        dropout_rng: a key for LoRA dropout (cfg.lora.dropout > 0; training only), else None.
        return_router_stats: also return the MoE layers' routing over the real tokens, ([M, X]
        picks, [M, X] router probabilities, [M] z-loss sums) per MoE layer in layer order
        (`jaxft.models.moe.router_stats`; None
        for a dense model): `(out, stats)` (training forward only).
        """
        cfg = self.cfg
        tokens_BL = tokens
        B, L = tokens_BL.shape
        positions_BL = (jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)) if positions is None
                        else positions)
        segment_ids_BL = jnp.ones((B, L), jnp.int32) if segment_ids is None else segment_ids
        x_BLE = jnp.take(self.embed_tokens[...], tokens_BL, axis=0).astype(cfg.compute_dtype)
        if cfg.embed_scale:  # Gemma: sqrt(hidden), rounded to the compute dtype as transformers does
            x_BLE = x_BLE * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.compute_dtype)
        x_BLE = constrain(x_BLE, ("act_batch", "act_length", "act_embed"))
        use_dropout = dropout_rng is not None and cache is None and cfg.lora is not None and cfg.lora.dropout > 0
        rng = dropout_rng if use_dropout else None
        if cfg.grouped_layers:
            per_layer_BLNP = self._per_layer_inputs(tokens_BL, x_BLE) if cfg.per_layer_input_size else None
            if cfg.scan_layers:
                x_BLE, new_cache, router = layer_groups.run_scanned(
                    cfg, self.groups, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng, per_layer_BLNP)
            else:
                x_BLE, new_cache, router = self._run_unrolled(x_BLE, positions_BL, segment_ids_BL, cache,
                                                              cache_index, rng, per_layer_BLNP)
        else:
            run = self._run_scanned if cfg.scan_layers else self._run_unrolled
            x_BLE, new_cache, router = run(x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng)
        out = self.norm(x_BLE)
        if not return_hidden:
            # f32 accumulation and output: bf16 logits would round the softmax's inputs.
            out = jnp.einsum("...E,EV->...V", _token_rows(out), self.lm_head_kernel().astype(out.dtype),
                             preferred_element_type=jnp.float32).reshape(B, L, -1)
            out = soft_cap(out, cfg.final_logit_softcap)
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            return (out, router) if return_router_stats else out
        return out, new_cache


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache: k / v [B, K, S, D] per layer, heads-major (stacked [N, B, K, S, D] for a scanned
    model, a list of N otherwise), and key segment ids [B, S] (0 = empty). A model with
    `layer_specs` (Gemma 4) holds each layer's own shape, per LayerGroup stack when scanned, and
    nothing for layers that read another layer's keys and values. Multi-head latent attention
    (DeepSeek) caches the latent [B, S, R] and the shared RoPE key [B, S, D_r] instead of k / v."""
    dtype = dtype or cfg.compute_dtype
    if cfg.layer_specs() is not None:
        return layer_groups.init_cache(cfg, batch_size, max_length, dtype)
    shapes = layer_groups.layer_cache_shapes(cfg, batch_size, max_length, cfg.num_kv_heads, cfg.dim_per_head)
    if cfg.scan_layers:
        kv = {n: jnp.zeros((cfg.num_layers,) + shape, dtype) for n, shape in shapes.items()}
    else:
        kv = {n: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for n, shape in shapes.items()}
    return {**kv, "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32)}
