"""Small parts the decoder is assembled from: parameters with logical axes, the norms, the MLP
activations and soft-capping. Numerics follow transformers' PyTorch modules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

_INIT_STD = 0.02  # transformers' default initializer_range


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def bcast(w: jax.Array, x: jax.Array) -> jax.Array:
    """Leading unit axes so `w` (trailing dims of x) broadcasts without rank promotion."""
    return w.reshape((1,) * (x.ndim - w.ndim) + w.shape)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32 (returned as float32)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """kind "rms" (Llama): w * normed, in x's dtype; "rms_plus_one" (Gemma 2 / 3): normed *
    (1 + w) in float32, then cast (its checkpoints store w as an offset from 1, initialised at
    0); "rms_f32" (Gemma 4): normed * w in float32, then cast."""

    def __init__(self, dim: int, eps: float, *, param_dtype, axis: str = "norm", kind: str = "rms"):
        self.weight = param(None, (dim,), (axis,), param_dtype, init="zeros" if kind == "rms_plus_one" else "ones")
        self.eps = eps
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalize(x, self.eps)
        if self.kind == "rms_plus_one":
            return (normed * (1.0 + bcast(self.weight[...].astype(jnp.float32), x))).astype(x.dtype)
        if self.kind == "rms_f32":
            return (normed * bcast(self.weight[...].astype(jnp.float32), x)).astype(x.dtype)
        return bcast(self.weight[...].astype(x.dtype), x) * normed.astype(x.dtype)


# The MLP's gate activation by `ModelConfig.activation`: SwiGLU (silu) and GeGLU (tanh-GELU,
# transformers' gelu_pytorch_tanh).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def gated(activation: str, gate: jax.Array, up: jax.Array, *, limit: float = 7.0, alpha: float = 1.702) -> jax.Array:
    """A gated MLP's hidden units from its gate and up projections: act(gate) * up for the
    `ACTIVATIONS`; "clamped_swiglu" (gpt-oss's experts): the gate clamped above at `limit`, up
    clamped to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    if activation != "clamped_swiglu":
        return ACTIVATIONS[activation](gate) * up
    gate = jnp.minimum(gate, jnp.asarray(limit, gate.dtype))
    up = jnp.clip(up, jnp.asarray(-limit, up.dtype), jnp.asarray(limit, up.dtype))
    return (up + 1) * (gate * jax.nn.sigmoid(gate * jnp.asarray(alpha, gate.dtype)))


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x unchanged when cap is None."""
    return x if not cap else cap * jnp.tanh(x / cap)
