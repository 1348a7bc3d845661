"""Multi-head latent attention (DeepSeek-V2 / V3): keys and values come from one low-rank latent
per token, so a KV cache holds that latent and one shared RoPE key instead of per-head keys and
values.

  queries   q_proj (DeepSeek-V2-Lite) or q_a_proj -> RMSNorm -> q_b_proj: per head D_n + D_r dims
  latent    kv_a_proj_with_mqa -> [R latent (RMSNorm'd), D_r shared RoPE key]
  keys      kv_b_proj(latent) per head: D_n "nope" dims, then the shared RoPE key (all heads)
  values    kv_b_proj(latent) per head: D_v dims
  output    o_proj from H * D_v

RoPE turns only the D_r dims. DeepSeek's checkpoints lay those out as interleaved pairs (x0, x1),
(x2, x3), ... (V2 always; V3 when `rope_interleave`): they are de-interleaved here and then
rotated by rotate-half, which turns each pair by its frequency as transformers does (the
output's dim order differs from V2's complex-number form, the attention scores do not).
The softmax scale is (D_n + D_r) ** -0.5 times YaRN's mscale(factor, mscale_all_dim) ** 2.

LoRA (`cfg.lora`) adapts any of these projections by its checkpoint name (q_proj, q_a_proj,
q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj): each adapter adds to its projection's output
before what follows it (the latent norms, the split into keys and values, RoPE).

The cache (decode and prefill) stores the normed latent [B, S, R] and the roped shared key
[B, S, D_r]; each step expands the cached latent through kv_b_proj into keys and values (no
weight absorption: the same math as training, at the cost of an [B, S, H, D] expansion per step).

Axis letters as in decoder.py, plus R kv_lora_rank, Q q_lora_rank, N D_n + D_v (kv_b_proj's
per-head output).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import lora
from jaxft.models.attention import attend
from jaxft.models.parts import RMSNorm, param as _param
from jaxft.models.quantize import kernel_value
from jaxft.models.rope import apply_rope, softmax_mscale
from jaxft.parallel.sharding import constrain

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def deinterleave(x: jax.Array) -> jax.Array:
    """[..., D] pairs (x0, x1), (x2, x3), ... as [x0, x2, ..., x1, x3, ...] (rotate-half's layout)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLA(nnx.Module):
    """Multi-head latent attention; called like `decoder.Attention` (x, positions, segment ids,
    cache, cache index) and returning (out, new cache, None). Its cache: {"latent": [B, S, R],
    "k_rope": [B, S, D_r], "segment_ids": [B, S]}."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        E, H, pd = cfg.hidden_size, cfg.num_heads, cfg.param_dtype
        R, Dn, Dr, Dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.cfg = cfg
        if cfg.q_lora_rank:
            Q = cfg.q_lora_rank
            self.q_a_proj = _param(rngs, (E, Q), ("embed", "q_lora"), pd)
            self.q_a_layernorm = RMSNorm(Q, LATENT_NORM_EPS, param_dtype=pd, axis="q_lora")
            self.q_b_proj = _param(rngs, (Q, H, Dn + Dr), ("q_lora", "q_heads", "head_dim"), pd)
        else:
            self.q_proj = _param(rngs, (E, H, Dn + Dr), ("embed", "q_heads", "head_dim"), pd)
        self.kv_a_proj_with_mqa = _param(rngs, (E, R + Dr), ("embed", "kv_lora"), pd)
        self.kv_a_layernorm = RMSNorm(R, LATENT_NORM_EPS, param_dtype=pd, axis="kv_lora")
        self.kv_b_proj = _param(rngs, (R, H, Dn + Dv), ("kv_lora", "q_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (H, Dv, E), ("q_heads", "head_dim", "embed"), pd)
        lora.add_adapters(self, cfg, lora.attention_projections(cfg), rngs)

    def _adapt(self, name, x, y, rng):
        return lora.adapt(self, name, x, y, self.cfg.lora, rng)

    def _queries(self, x, rng=None):
        dtype = x.dtype
        if self.cfg.q_lora_rank:
            q = self.q_a_layernorm(self._adapt("q_a_proj", x, x @ kernel_value(self.q_a_proj, dtype), rng))
            return self._adapt("q_b_proj", q, jnp.einsum("...Q,QHD->...HD", q, kernel_value(self.q_b_proj, dtype)), rng)
        return self._adapt("q_proj", x, jnp.einsum("...E,EHD->...HD", x, kernel_value(self.q_proj, dtype)), rng)

    def expand(self, latent_BSR, k_rope_BSD, rng=None):
        """Per-head keys [B, S, H, D_n + D_r] and values [B, S, H, D_v] of cached latents."""
        Dn = self.cfg.qk_nope_head_dim
        kv_BSHN = jnp.einsum("BSR,RHN->BSHN", latent_BSR, kernel_value(self.kv_b_proj, latent_BSR.dtype))
        kv_BSHN = self._adapt("kv_b_proj", latent_BSR, kv_BSHN, rng)
        k_nope, v_BSHD = kv_BSHN[..., :Dn], kv_BSHN[..., Dn:]
        k_rope = jnp.broadcast_to(k_rope_BSD[:, :, None, :], k_nope.shape[:-1] + k_rope_BSD.shape[-1:])
        return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v_BSHD

    def __call__(self, x_BLE, positions_BL, segment_ids_BL, cache=None, cache_index=None, rng=None, kind=0,
                 shared_kv=None):
        """x_BLE: [B, L, E] or [B * L, E] token rows; the result is shaped as x. rng: the layer's
        LoRA dropout key (or None); kind and shared_kv are `Attention`'s (one layer kind, no KV
        sharing here)."""
        del kind, shared_kv
        cfg = self.cfg
        B, L = positions_BL.shape
        R, Dn, Dr, Dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        rope = cfg.layer_kinds()[0][0].rope
        x = x_BLE.reshape(B, L, -1)
        q_BLHD = self._queries(x, rng)
        q_nope, q_rope = q_BLHD[..., :Dn], q_BLHD[..., Dn:]
        kv_a = self._adapt("kv_a_proj_with_mqa", x, x @ kernel_value(self.kv_a_proj_with_mqa, x.dtype), rng)
        latent_BLR, k_rope_BLD = self.kv_a_layernorm(kv_a[..., :R]), kv_a[..., R:]
        if cfg.rope_interleave:
            q_rope, k_rope_BLD = deinterleave(q_rope), deinterleave(k_rope_BLD)
        q_rope = apply_rope(q_rope, positions_BL, rope)
        k_rope_BLD = apply_rope(k_rope_BLD[:, :, None, :], positions_BL, rope)[:, :, 0, :]
        if cache is None:
            latent_BSR, k_rope_BSD, kv_segments_BS, q_offset, new_cache = (
                latent_BLR, k_rope_BLD, segment_ids_BL, 0, None)
        else:  # write this chunk's latents at cache_index, attend over the cache
            latent_BSR = jax.lax.dynamic_update_slice(cache["latent"], latent_BLR.astype(cache["latent"].dtype),
                                                      (0, cache_index, 0))
            k_rope_BSD = jax.lax.dynamic_update_slice(cache["k_rope"], k_rope_BLD.astype(cache["k_rope"].dtype),
                                                      (0, cache_index, 0))
            kv_segments_BS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BL.astype(jnp.int32),
                                                          (0, cache_index))
            new_cache = {"latent": latent_BSR, "k_rope": k_rope_BSD, "segment_ids": kv_segments_BS}
            q_offset = cache_index
        k_BSHD, v_BSHD = self.expand(latent_BSR.astype(x.dtype), k_rope_BSD.astype(x.dtype), rng)
        q_BLHD = jnp.concatenate([q_nope, q_rope], axis=-1)
        # `attend` wants one head dim for q, k and v and scales by its ** -0.5: pad the narrower
        # side with zeros (no change to scores or outputs) and fold the true scale into q.
        D = max(Dn + Dr, Dv)
        scale = (Dn + Dr) ** -0.5 * softmax_mscale(rope.scaling) * math.sqrt(D)
        q_BLHD = q_BLHD * jnp.asarray(scale, q_BLHD.dtype)
        pad = lambda a: a if a.shape[-1] == D else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, D - a.shape[-1])])
        q_BLHD = constrain(pad(q_BLHD), ("act_batch", "act_length", "act_heads", None))
        out_BLHD = attend(q_BLHD, pad(k_BSHD), pad(v_BSHD), q_segment_ids_BL=segment_ids_BL,
                          kv_segment_ids_BS=kv_segments_BS, q_offset=q_offset, implementation=cfg.attention)
        out_BLHD = out_BLHD[..., :Dv].astype(x.dtype)
        y = jnp.einsum("BLHD,HDE->BLE", out_BLHD, kernel_value(self.o_proj, x.dtype))
        y = self._adapt("o_proj", out_BLHD, y, rng)
        return y.reshape(x_BLE.shape), new_cache, None
