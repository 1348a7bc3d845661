"""MXFP4 (the OCP microscaling FP4 format; the released gpt-oss-20b / 120b store their experts so):
dequantized on load, or kept as a QLoRA base (`lora.base_quantization=mxfp4`, `jaxft.models.quantize`).

A checkpoint stores a quantized tensor `W` as `W_blocks` uint8 [..., R, G, 16] and `W_scales`
uint8 [..., R, G]: each row of R holds G blocks of 32 FP4 (E2M1) codes, two a byte (low nibble
first), and one E8M0 exponent a block (bias 127). The value of code c in block g is
FP4_VALUES[c] * 2 ** (scales[g] - 127). As transformers' `convert_moe_packed_tensors`, the
dequantized tensor swaps the last two axes: [..., G * 32, R] (gpt-oss's experts: gate_up_proj
[X, E, 2F] from blocks [X, 2F, E / 32, 16], down_proj [X, F, E] from [X, E, F / 32, 16]).

Values are exact in bfloat16 (an FP4 value has at most two significant bits), so `dequantize`
returns bfloat16, one leading index at a time (a layer's experts are never whole in float32).
`unpack` gives the same codes and exponents in a kernel's layout instead, [..., in, out] codes
and [..., in / 32, out] exponents, for a base kept in MXFP4; `quantize` makes them from float
weights (OCP's rounding), and gives back a checkpoint's own codes' values exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32  # values sharing one E8M0 exponent
BIAS = 127  # E8M0's exponent bias
_EMAX = 2  # the largest FP4 value's exponent (6 = 1.5 * 2 ** 2)


class Packed(NamedTuple):
    """A checkpoint's MXFP4 tensor in a kernel's layout, on the host: codes uint4 [..., in, out]
    (one a byte in numpy; packed two a byte on TPU and GPU) and E8M0 exponents uint8
    [..., in / 32, out]."""
    codes: np.ndarray
    exponents: np.ndarray


def _check(blocks, scales):
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                         "([..., R, G, 16] and [..., R, G])")


def _codes(blocks: np.ndarray) -> np.ndarray:
    """uint8 [..., R, G, 16] -> one code a byte, [..., R, G * 32] (low nibble first)."""
    b = blocks.astype(np.uint8)
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-2], b.shape[-2] * 32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., R, G, 16], scales uint8 [..., R, G] -> bfloat16 [..., G * 32, R]."""
    _check(blocks, scales)
    *lead, R, G, _ = blocks.shape
    blocks = blocks.reshape(-1, R, G, 16)
    scales = scales.reshape(-1, R, G)
    out = np.empty((blocks.shape[0], G * 32, R), jnp.bfloat16)
    for i in range(blocks.shape[0]):  # one leading index at a time: float32 only for [R, G, 32]
        codes = _codes(blocks[i]).reshape(R, G, 32)
        values = np.ldexp(FP4_VALUES[codes], scales[i].astype(np.int32)[..., None] - BIAS)
        out[i] = values.reshape(R, G * 32).T.astype(jnp.bfloat16)
    return out.reshape(*lead, G * 32, R)


def unpack(blocks: np.ndarray, scales: np.ndarray) -> Packed:
    """The checkpoint's codes and exponents, unchanged, laid out as `dequantize` lays out values:
    codes uint4 [..., G * 32, R], exponents uint8 [..., G, R]."""
    _check(blocks, scales)
    codes = np.swapaxes(_codes(blocks), -1, -2).astype(jnp.uint4)
    return Packed(np.ascontiguousarray(codes), np.ascontiguousarray(np.swapaxes(scales, -1, -2)).astype(np.uint8))


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, R, G, _ = blocks_shape
    return (*lead, G * 32, R)


def packed_names(names) -> dict[str, tuple[str, str]]:
    """{tensor name: (its blocks name, its scales name)} for the MXFP4 tensors among `names`."""
    names = set(names)
    return {n[: -len(BLOCKS)]: (n, n[: -len(BLOCKS)] + SCALES) for n in names
            if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names}


def scale_of(exponents: jax.Array) -> jax.Array:
    """E8M0 exponents (uint8) -> float32 2 ** (e - 127), built from the bits (exact; e = 0,
    2 ** -127, reads 0 as TPUs flush it, and no weight's block is that small)."""
    return jax.lax.bitcast_convert_type(exponents.astype(jnp.uint32) << 23, jnp.float32)


# Midpoints between consecutive FP4 magnitudes; a tie goes to the even code (round half to
# even, as OCP's conversion): up where the upper code is even, down where it is odd.
_MIDPOINTS = (FP4_VALUES[1:8] + FP4_VALUES[:7]) / 2


def quantize(x: jax.Array, axis: int, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """float x [..., N, ...] -> (codes uint4 of x's shape, exponents uint8 with N / block along
    `axis`): OCP MX's conversion, each block's exponent floor(log2(absmax)) - 2, each value
    divided by 2 ** exponent and rounded to the nearest FP4 value (saturating at 6)."""
    x = x.astype(jnp.float32)
    shape = x.shape
    blocked = x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True)
    _, e = jnp.frexp(absmax)  # absmax = m * 2 ** e, m in [0.5, 1): floor(log2(absmax)) = e - 1
    exponents = jnp.clip(e - 1 - _EMAX + BIAS, 1, 254)
    scaled = jnp.abs(jnp.ldexp(blocked, BIAS - exponents))
    magnitude = sum((scaled >= m if j % 2 else scaled > m).astype(jnp.uint8) for j, m in enumerate(_MIDPOINTS))
    codes = magnitude + (blocked < 0).astype(jnp.uint8) * 8
    return codes.reshape(shape).astype(jnp.uint4), jnp.squeeze(exponents, axis + 1).astype(jnp.uint8)
