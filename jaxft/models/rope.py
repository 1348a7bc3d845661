"""Rotary position embeddings: the inverse frequencies of each RoPE kind and their application.

A `Rope` holds what one attention layer needs: theta, the scaling of the checkpoint's
`rope_scaling` / `rope_parameters` (none, linear, llama3, longrope, yarn, and Gemma 4's proportional:
rotate-half over the whole head with only the first `partial_rotary_factor` of its angles
turning), and the rotated fraction
of each head (`partial_rotary_factor`: Phi-3.5 / Phi-4-mini rotate part of a head). Layers of
different kinds may carry different ropes (Gemma 3: local layers theta 10k, global 1M scaled).
Numerics follow transformers: f32 frequencies, rotate-half, cos / sin cast to the activations'
dtype, LongRoPE's attention factor multiplied into cos and sin.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "proportional", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """theta; scaling: None or the HF dict ({"rope_type": ..., "factor": ..., ...});
    partial: the rotated fraction of each head's dims (1.0 = all)."""

    theta: float = 10000.0
    scaling: dict | None = None
    partial: float = 1.0
    max_positions: int = 0  # the model's max_position_embeddings (LongRoPE's default factor)

    def __post_init__(self):
        kind = (self.scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {kind!r} is not supported; jaxft supports "
                              f"{', '.join(ROPE_TYPES)}")

    def __hash__(self):  # scaling is a dict: hash its items (long factor lists as tuples)
        items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (self.scaling or {}).items()))
        return hash((self.theta, items, self.partial, self.max_positions))

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _llama3(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1: leave high frequencies, divide low ones by `factor`, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def inv_freqs(rope: Rope, head_dim: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """([R/2] f32 inverse frequencies, the long-context ones or None, attention factor), R the
    rotary dim. Only LongRoPE has a second set: rows longer than its original length use it."""
    dim = rope.rotary_dim(head_dim)
    base = _base_inv_freq(rope.theta, dim)
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return (base / scaling["factor"]).astype(np.float32), None, 1.0
    if kind == "llama3":
        return _llama3(base, scaling).astype(np.float32), None, 1.0
    if kind == "proportional":  # Gemma 4: the first angles of the full head's frequencies, the rest 0
        angles = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
        freqs = np.zeros(head_dim // 2, np.float32)
        freqs[:angles] = _base_inv_freq(rope.theta, head_dim)[:angles]
        return (freqs / scaling.get("factor", 1.0)).astype(np.float32), None, 1.0
    if kind == "yarn":
        return _yarn(rope, dim)
    if kind == "longrope":
        short = base / np.asarray(scaling["short_factor"], np.float32)
        long = base / np.asarray(scaling["long_factor"], np.float32)
        return short.astype(np.float32), long.astype(np.float32), _longrope_factor(scaling, rope.max_positions)
    return base.astype(np.float32), None, 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction (its Eq. 21): 0.1 * mscale * ln(scale) + 1, 1 for scale <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Rope, dim: int) -> tuple[np.ndarray, None, float]:
    """YaRN (transformers' `_compute_yarn_parameters`): each frequency blends its interpolated
    (divided by `factor`) and original value by a linear ramp over the dims between the
    correction range of beta_fast and beta_slow rotations at the original length; the
    attention factor (on cos and sin) is given, or mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are set (DeepSeek), else mscale(factor)."""
    s = rope.scaling
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or rope.max_positions / original
    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention = yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = (rope.theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), None, float(attention)


def softmax_mscale(scaling: dict | None) -> float:
    """The factor on the attention softmax scale that MLA models (DeepSeek) take from a scaled
    RoPE with `mscale_all_dim`: mscale(factor, mscale_all_dim) ** 2 (transformers'
    `yarn_apply_mscale`); 1 otherwise."""
    scaling = scaling or {}
    if scaling.get("rope_type", "default") == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


def _longrope_factor(scaling: dict, max_positions: int) -> float:
    """LongRoPE's attention factor (transformers' rule): given, or from the length ratio."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, rope: Rope) -> jax.Array:
    """Rotate-half rotary embedding at explicit positions (restarting per packed example).
    Dims past the rotary dim pass through. LongRoPE takes its long frequencies when the largest
    position reaches its original length, as transformers does (per call, traceable)."""
    D = x_BLHD.shape[-1]
    short, long, factor = inv_freqs(rope, D)
    pos = positions_BL[..., None].astype(jnp.float32)
    angles = pos * short[None, None, :]  # [B, L, R/2]
    if long is not None:
        original = rope.scaling["original_max_position_embeddings"]
        use_long = jnp.max(positions_BL) + 1 > original
        angles = jnp.where(use_long, pos * long[None, None, :], angles)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    cos, sin = cos.astype(x_BLHD.dtype), sin.astype(x_BLHD.dtype)
    R = angles.shape[-1]
    x_rot, x_pass = (x_BLHD, None) if R == D else (x_BLHD[..., :R], x_BLHD[..., R:])
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    out = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)
