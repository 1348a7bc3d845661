"""MXFP4 checkpoints (the released gpt-oss-20b / 120b store their experts so): dequantized on load.

A quantized tensor `W` is stored as `W_blocks` uint8 [..., R, G, 16] and `W_scales` uint8
[..., R, G]: each row of R holds G blocks of 32 FP4 (E2M1) codes, two a byte (low nibble first),
and one E8M0 exponent a block (bias 127). The value of code c in block g is
FP4_VALUES[c] * 2 ** (scales[g] - 127). As transformers' `convert_moe_packed_tensors`, the
dequantized tensor swaps the last two axes: [..., G * 32, R] (gpt-oss's experts: gate_up_proj
[X, E, 2F] from blocks [X, 2F, E / 32, 16], down_proj [X, F, E] from [X, E, F / 32, 16]).

Values are exact in bfloat16 (an FP4 value has at most two significant bits), so this returns
bfloat16, one leading index at a time (a layer's experts are never whole in float32).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., R, G, 16], scales uint8 [..., R, G] -> bfloat16 [..., G * 32, R]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                         "([..., R, G, 16] and [..., R, G])")
    *lead, R, G, _ = blocks.shape
    blocks = blocks.reshape(-1, R, G, 16)
    scales = scales.reshape(-1, R, G)
    out = np.empty((blocks.shape[0], G * 32, R), jnp.bfloat16)
    for i in range(blocks.shape[0]):  # one leading index at a time: float32 only for [R, G, 32]
        b = blocks[i].astype(np.uint8)
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(R, G, 32)
        values = np.ldexp(FP4_VALUES[codes], scales[i].astype(np.int32)[..., None] - 127)
        out[i] = values.reshape(R, G * 32).T.astype(jnp.bfloat16)
    return out.reshape(*lead, G * 32, R)


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, R, G, _ = blocks_shape
    return (*lead, G * 32, R)


def packed_names(names) -> dict[str, tuple[str, str]]:
    """{tensor name: (its blocks name, its scales name)} for the MXFP4 tensors among `names`."""
    names = set(names)
    return {n[: -len(BLOCKS)]: (n, n[: -len(BLOCKS)] + SCALES) for n in names
            if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names}
