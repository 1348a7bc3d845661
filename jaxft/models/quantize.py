"""A frozen base stored quantized (QLoRA): `lora.base_quantization` = none | int8 | nf4 | mxfp4.

int8 and nf4 quantize the projection kernels (q/k/v/o or multi-head latent attention's,
gate/up/down of dense MLPs, shared experts and the stacked routed experts: every matmul of the
layers but the router); mxfp4 only the routed experts (most of an MoE's bytes), as gpt-oss is
released. Each becomes a `QuantizedKernel` of integer codes and scales; embeddings, the output
head and the norms stay as they are (as bitsandbytes / PEFT's QLoRA leave them). Each layer
de-quantizes its kernels to the compute dtype right before its matmuls, so only one layer's
worth is ever held in full precision.

  int8   symmetric, one scale per output channel (absmax over the input dims): 1 byte a weight.
  nf4    4-bit NormalFloat (Dettmers et al. 2023, QLoRA): blocks of 64 along the input dim,
         each scaled by its absmax and rounded to the nearest of 16 normal-quantile levels;
         codes are `uint4` (packed two a byte on TPU and GPU): ~0.56 bytes a weight.
  mxfp4  OCP microscaling FP4 (`jaxft.models.mxfp4`): blocks of 32 along the input dim, each an
         E8M0 exponent (uint8) and 32 E2M1 codes (`uint4`): 4.25 bits a weight. A checkpoint
         stored in MXFP4 (gpt-oss's) keeps its own codes and exponents (`load_weights` with
         keep_mxfp4); other weights are quantized by OCP's rounding. Only MoE models.

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

from jaxft.errors import ConfigError, DataError
from jaxft.models import mxfp4
from jaxft.models.layer_groups import layer_path
from jaxft.models.lora import MLP_PROJECTIONS, PROJECTIONS, projection_dims, target_of
from jaxft.models.paths import get_path, set_path
from jaxft.parallel.sharding import logical_to_spec

QUANTIZATIONS = ("none", "int8", "nf4", "mxfp4")
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
    """A kernel as integer codes (the kernel's shape) and scales.

    int8: float32 scale of the kernel's shape with the input dims reduced to 1.
    nf4 / mxfp4: codes index a table of 16 levels (NF4's, or FP4's values); the scale has the
    kernel's shape with axis `block_axis` (the last input dim, counted from the end so a
    scanned model's layer slices keep it) divided into blocks of `block`: float32 absmax for
    nf4, uint8 E8M0 exponents for mxfp4."""
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
        levels, scale = ((mxfp4.FP4_VALUES, mxfp4.scale_of(self.scale)) if self.kind == "mxfp4"
                         else (NF4_LEVELS, self.scale))
        values = jnp.asarray(levels)[self.codes.astype(jnp.int32)].reshape(blocked)
        return (values * jnp.expand_dims(scale, axis + 1)).reshape(shape).astype(dtype)


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


def _block_size(dim: int, most: int = NF4_BLOCK) -> int:
    """The largest block <= `most` that divides `dim` (64 for nf4 and 32 for mxfp4 in every real model)."""
    return max(b for b in range(1, min(most, dim) + 1) if dim % b == 0)


def quantize_kernel(x: jax.Array, kind: str, in_ndim: int, out_ndim: int) -> QuantizedKernel:
    """Quantizes one kernel [..., *in dims, *out dims] (leading axes: stacked layers, experts)."""
    x = x.astype(jnp.float32)
    in_axes = tuple(range(x.ndim - in_ndim - out_ndim, x.ndim - out_ndim))
    if kind == "int8":
        scale = jnp.max(jnp.abs(x), axis=in_axes, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return QuantizedKernel(codes, scale, "int8")
    if kind not in ("nf4", "mxfp4"):
        raise ConfigError(f"lora.base_quantization={kind!r}: choose one of {', '.join(QUANTIZATIONS)}")
    axis = in_axes[-1]
    if kind == "mxfp4":
        block = _block_size(x.shape[axis], mxfp4.BLOCK)
        codes, exponents = mxfp4.quantize(x, axis, block)
        return QuantizedKernel(codes, exponents, "mxfp4", block_axis=axis - x.ndim, block=block)
    block = _block_size(x.shape[axis])
    blocked = x.reshape(x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocked / absmax
    codes = sum((normed > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS)  # nearest level, fused
    return QuantizedKernel(codes.reshape(x.shape).astype(jnp.uint4), jnp.squeeze(absmax, axis + 1), "nf4",
                           block_axis=axis - x.ndim, block=block)


def routed_expert(cfg, path: tuple) -> bool:
    """Whether `path` (in a params tree) is a routed experts' stacked kernel [..., X, in, out]."""
    if len(path) < 2 or path[-2] != "mlp" or path[-1] not in MLP_PROJECTIONS:
        return False
    return any(cfg.is_moe_layer(i) and layer_path(cfg, i)[0] == tuple(path[:-2]) for i in range(cfg.num_layers))


def quantizes(cfg, kind: str, path: tuple) -> bool:
    """Whether `kind` stores the param at `path` quantized: every projection kernel for int8 and
    nf4, the routed experts' for mxfp4."""
    if kind == "none" or target_of(path[-1]) not in PROJECTIONS:
        return False
    return kind != "mxfp4" or routed_expert(cfg, path)


def check_quantization(cfg, kind: str) -> None:
    """Refuses mxfp4 for a model without routed experts (it quantizes nothing else)."""
    if kind == "mxfp4" and not cfg.num_experts:
        raise ConfigError(f"lora.base_quantization='mxfp4' stores the routed experts of a mixture-of-experts "
                          f"model in MXFP4; this {cfg.model_type} model has none: use nf4 or int8")


def _kernels(cfg, tree: dict, kind: str, prefix=()):
    """(path, projection name) of every kernel of a params tree that `kind` quantizes."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _kernels(cfg, value, kind, prefix + (key,))
        elif quantizes(cfg, kind, prefix + (key,)):
            yield prefix + (key,), key


def _dims(cfg, path: tuple, name: str, ndim: int) -> tuple[int, int, tuple]:
    """(in dims, out dims, logical axes) of the kernel at `path` with `ndim` dims."""
    experts = routed_expert(cfg, path)
    in_shape, in_axes, out_shape, out_axes = projection_dims(cfg, name, experts=experts)
    lead = ndim - len(in_shape) - len(out_shape)
    lead_axes = ("layers",) * (lead - 1) + ("experts",) if experts else ("layers",) * lead
    return len(in_shape), len(out_shape), lead_axes + in_axes + out_axes


def _place(x: np.ndarray, sharding):
    """A host array on the devices, straight into its shards when `sharding` is given."""
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def quantizer(cfg, kind: str, shardings: dict | None = None):
    """`fn(path, array)`: the array quantized if `kind` quantizes `path`'s kernel, else itself
    (one jitted call per kernel); `shardings` from `quantized_shardings`, or None. HF loading
    applies it to each tensor as it arrives, so the full-precision base never exists whole. An
    `mxfp4.Packed` (a checkpoint's MXFP4 tensor, kept: `load_weights(keep_mxfp4=True)`) is
    placed on the devices as it is."""

    def fn(path: tuple, x):
        sharding = get_path(shardings, path) if shardings is not None else None
        if isinstance(x, mxfp4.Packed):
            if kind != "mxfp4" or not routed_expert(cfg, path):
                raise DataError(f"{'/'.join(map(str, path))}: an MXFP4 checkpoint tensor is kept packed only as "
                                "routed experts under lora.base_quantization=mxfp4")
            return QuantizedKernel(_place(x.codes, sharding and sharding.codes),
                                   _place(x.exponents, sharding and sharding.scale), "mxfp4", block_axis=-2,
                                   block=mxfp4.BLOCK)
        if not quantizes(cfg, kind, path):
            return x
        in_ndim, out_ndim, _ = _dims(cfg, path, path[-1], x.ndim)
        jitted = jax.jit(quantize_kernel, static_argnums=(1, 2, 3), out_shardings=sharding)
        return jitted(x, kind, in_ndim, out_ndim)

    return fn


def quantize_base(cfg, base: dict, kind: str, shardings: dict | None = None) -> dict:
    """`base` with every kernel `kind` quantizes quantized, one kernel at a time."""
    if kind == "none":
        return base
    check_quantization(cfg, kind)
    out = jax.tree.map(lambda x: x, base)
    fn = quantizer(cfg, kind, shardings)
    for path, _ in list(_kernels(cfg, base, kind)):
        set_path(out, path, fn(path, get_path(out, path)))
    return out


def quantized_shardings(cfg, abstract_base: dict, kernel_shardings: dict, kind: str, mesh) -> dict:
    """Shardings of `quantize_base`'s result: codes as their kernel; scales by the kernel's
    logical axes where their (reduced) dims still divide the mesh, else replicated."""
    if kind == "none":
        return kernel_shardings
    check_quantization(cfg, kind)
    out = jax.tree.map(lambda x: x, kernel_shardings)
    for path, name in list(_kernels(cfg, abstract_base, kind)):
        kernel = get_path(abstract_base, path)
        in_ndim, out_ndim, axes = _dims(cfg, path, name, len(kernel.shape))
        q = jax.eval_shape(lambda k: quantize_kernel(k, kind, in_ndim, out_ndim), kernel)
        codes_sharding = get_path(kernel_shardings, path)
        scale = NamedSharding(mesh, logical_to_spec(axes, q.scale.shape, mesh))
        set_path(out, path, q.replace(codes=codes_sharding, scale=scale))
    return out


def quantized_bytes(x: QuantizedKernel) -> int:
    """Bytes of a quantized kernel on an accelerator (uint4 codes packed two a byte)."""
    per_code = 1 if x.kind == "int8" else 0.5
    return int(math.prod(x.codes.shape) * per_code + jnp.dtype(x.scale.dtype).itemsize * math.prod(x.scale.shape))


__all__ = ["NF4_LEVELS", "QUANTIZATIONS", "QuantizedKernel", "kernel_value", "quantize_base",
           "quantize_kernel", "quantized_shardings", "quantizer", "routed_expert"]
