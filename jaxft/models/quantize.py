"""A frozen base stored quantized (QLoRA): `lora.base_quantization` = none | int8 | nf4.

The projection kernels (q/k/v/o or multi-head latent attention's, gate/up/down of dense MLPs,
shared experts and the stacked routed experts: every matmul of the layers but the router) become a
`QuantizedKernel` of integer codes and float32 scales; embeddings, the output head and the
norms stay as they are (as bitsandbytes / PEFT's QLoRA leave them). Each layer de-quantizes
its kernels to the compute dtype right before its matmuls, so only one layer's worth is ever
held in full precision.

  int8  symmetric, one scale per output channel (absmax over the input dims): 1 byte a weight.
  nf4   4-bit NormalFloat (Dettmers et al. 2023, QLoRA): blocks of 64 along the input dim,
        each scaled by its absmax and rounded to the nearest of 16 normal-quantile levels;
        codes are `uint4` (packed two a byte on TPU and GPU): ~0.56 bytes a weight.

jaxft quantizes itself rather than through qwix: qwix's NF4 rounding materialises the
distance of every weight to all 16 levels (16 float32s a weight, 120 GB for one Llama-3-8B
MLP stack), while the rounding here is 15 fused comparisons, and one small pytree keeps both
schemes sharded like the kernels they replace.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from jaxft.errors import ConfigError
from jaxft.models.lora import PROJECTIONS, projection_dims, target_of
from jaxft.models.paths import get_path, set_path
from jaxft.parallel.sharding import logical_to_spec

QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK = 64

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA, App. E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@struct.dataclass
class QuantizedKernel:
    """A kernel as integer codes (the kernel's shape) and float32 scales.

    int8: scale has the kernel's shape with the input dims reduced to 1.
    nf4: scale has the kernel's shape with axis `block_axis` (the last input dim, counted from
    the end so a scanned model's layer slices keep it) divided into blocks of `block`."""
    codes: jax.Array
    scale: jax.Array
    kind: str = struct.field(pytree_node=False, default="int8")
    block_axis: int = struct.field(pytree_node=False, default=-1)
    block: int = struct.field(pytree_node=False, default=1)

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self, dtype) -> jax.Array:
        if self.kind == "int8":
            return (self.codes.astype(jnp.float32) * self.scale).astype(dtype)
        axis = self.codes.ndim + self.block_axis
        shape = self.codes.shape
        blocked = shape[:axis] + (shape[axis] // self.block, self.block) + shape[axis + 1:]
        values = jnp.asarray(NF4_LEVELS)[self.codes.astype(jnp.int32)].reshape(blocked)
        scale = jnp.expand_dims(self.scale, axis + 1)
        return (values * scale).reshape(shape).astype(dtype)


@jax.custom_vjp
def _to_bf16(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounded to nearest even as `astype` rounds, in integer ops.

    Why not `astype`: XLA's TPU compiler moves a convert of a scanned layer's kernel slice out
    of the layer loop onto the whole [layers, ...] stack, a bf16 copy of every layer held
    through the step (2.1 GiB of temporaries a chip for Llama-3-8B, FSDP 4, 4k tokens). It
    does not move these integer ops, so only the current layer's kernel is converted."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
    rounded = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC0), rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(rounded, jnp.bfloat16)


_to_bf16.defvjp(lambda x: (_to_bf16(x), None), lambda _, g: (g.astype(jnp.float32),))


def kernel_value(variable, dtype) -> jax.Array:
    """A kernel Param's value in `dtype`, de-quantized when the base is stored quantized."""
    value = variable.get_value()
    if isinstance(value, QuantizedKernel):
        return value.dequantize(dtype)
    if value.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.bfloat16:
        return _to_bf16(value)
    return value.astype(dtype)


def _block_size(dim: int) -> int:
    """The largest block <= NF4_BLOCK that divides `dim` (64 for every real model)."""
    return max(b for b in range(1, min(NF4_BLOCK, dim) + 1) if dim % b == 0)


def quantize_kernel(x: jax.Array, kind: str, in_ndim: int, out_ndim: int) -> QuantizedKernel:
    """Quantizes one kernel [..., *in dims, *out dims] (leading axes: stacked layers)."""
    x = x.astype(jnp.float32)
    in_axes = tuple(range(x.ndim - in_ndim - out_ndim, x.ndim - out_ndim))
    if kind == "int8":
        scale = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return QuantizedKernel(codes, scale, "int8")
    if kind != "nf4":
        raise ConfigError(f"lora.base_quantization={kind!r}: choose one of {', '.join(QUANTIZATIONS)}")
    axis = in_axes[-1]
    block = _block_size(x.shape[axis])
    blocked = x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocked / absmax
    codes = sum((normed > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)  # nearest level, fused
    return QuantizedKernel(codes.reshape(x.shape).astype(jnp.uint4), jnp.squeeze(absmax, axis + 1), "nf4",
                           block_axis=axis - x.ndim, block=block)


def _kernels(cfg, tree: dict, prefix=()):
    """(path, projection name) of every projection kernel in a params tree."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _kernels(cfg, value, prefix + (key,))
        elif target_of(key) in PROJECTIONS:
            yield prefix + (key,), key


def quantizer(cfg, kind: str, shardings: dict | None = None):
    """`fn(path, array)`: the array quantized if `path` is a projection kernel's, else itself
    (one jitted call per kernel); `shardings` from `quantized_shardings`, or None. HF loading
    applies it to each tensor as it arrives, so the full-precision base never exists whole."""

    def fn(path: tuple, x):
        name = path[-1]
        if kind == "none" or target_of(name) not in PROJECTIONS:
            return x
        in_shape, _, out_shape, _ = projection_dims(cfg, name)
        jitted = jax.jit(quantize_kernel, static_argnums=(1, 2, 3),
                         out_shardings=get_path(shardings, path) if shardings is not None else None)
        return jitted(x, kind, len(in_shape), len(out_shape))

    return fn


def quantize_base(cfg, base: dict, kind: str, shardings: dict | None = None) -> dict:
    """`base` with every projection kernel quantized, one kernel at a time."""
    if kind == "none":
        return base
    out = jax.tree.map(lambda x: x, base)
    fn = quantizer(cfg, kind, shardings)
    for path, _ in list(_kernels(cfg, base)):
        set_path(out, path, fn(path, get_path(out, path)))
    return out


def quantized_shardings(cfg, abstract_base: dict, kernel_shardings: dict, kind: str, mesh) -> dict:
    """Shardings of `quantize_base`'s result: codes as their kernel; scales by the kernel's
    logical axes where their (reduced) dims still divide the mesh, else replicated."""
    if kind == "none":
        return kernel_shardings
    out = jax.tree.map(lambda x: x, kernel_shardings)
    for path, name in list(_kernels(cfg, abstract_base)):
        kernel = get_path(abstract_base, path)
        in_shape, in_axes, out_shape, out_axes = projection_dims(cfg, name)
        axes = ("layers",) * (len(kernel.shape) - len(in_shape) - len(out_shape)) + in_axes + out_axes
        q = jax.eval_shape(lambda k: quantize_kernel(k, kind, len(in_shape), len(out_shape)), kernel)
        codes_sharding = get_path(kernel_shardings, path)
        scale = NamedSharding(mesh, logical_to_spec(axes, q.scale.shape, mesh))
        set_path(out, path, q.replace(codes=codes_sharding, scale=scale))
    return out


def quantized_bytes(x: QuantizedKernel) -> int:
    """Bytes of a quantized kernel on an accelerator (uint4 codes packed two a byte)."""
    per_code = 0.5 if x.kind == "nf4" else 1
    return int(math.prod(x.codes.shape) * per_code + 4 * math.prod(x.scale.shape))


__all__ = ["NF4_LEVELS", "QUANTIZATIONS", "QuantizedKernel", "kernel_value", "quantize_base",
           "quantize_kernel", "quantized_shardings"]
