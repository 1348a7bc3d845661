"""What both chunked losses share (`chunked.py`, and `vocab_parallel.py` when the mesh splits the
vocabulary): where the trained tokens are (`Plan`: trained positions first, chunk by chunk), row
gathers, and one chunk's float32 logits. Axis legend as in chunked.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softcap(logits, cap):
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def gather_rows(x_GxM, index_GxC):
    """x[g, index[g, c]] for [G, M] or [G, M, E] x."""
    if x_GxM.ndim == 3:
        return jnp.take_along_axis(x_GxM, index_GxC[..., None], axis=1)
    return jnp.take_along_axis(x_GxM, index_GxC, axis=1)


class Plan:
    """Where the trained tokens are: `order` [G, P] positions, trained ones first (padded with
    position 0), `valid` [G, P] the trained prefix, `inverse` [G, M] each position's compact
    slot, and `num_chunks` the chunks the fullest group needs (a traced scalar)."""

    def __init__(self, order, valid, inverse, num_chunks, chunk: int):
        self.order, self.valid, self.inverse, self.num_chunks = order, valid, inverse, num_chunks
        self.chunk, self.padded = chunk, order.shape[1]

    @classmethod
    def of(cls, mask_GxM, chunk: int) -> "Plan":
        """The plan of a [G, M] target mask."""
        tokens = mask_GxM.shape[1]
        trained = mask_GxM > 0
        order = jnp.argsort(jnp.logical_not(trained), axis=1, stable=True).astype(jnp.int32)
        count = jnp.sum(trained, axis=1, dtype=jnp.int32)  # [G]
        padded = -(-tokens // chunk) * chunk
        return cls(order=jnp.pad(order, ((0, 0), (0, padded - tokens))),
                   valid=jnp.arange(padded, dtype=jnp.int32)[None, :] < count[:, None],
                   inverse=jnp.argsort(order, axis=1).astype(jnp.int32),
                   num_chunks=(jnp.max(count) + chunk - 1) // chunk, chunk=chunk)

    def arrays(self) -> tuple:
        """What the backward pass rebuilds the plan from (saved, not recomputed)."""
        return self.order, self.valid, self.inverse, self.num_chunks

    def slot(self, array_GxP, j):
        return jax.lax.dynamic_slice_in_dim(array_GxP, j * self.chunk, self.chunk, axis=1)

    def scatter_back(self, compact_GxP):
        """[G, P, ...] in compact order -> [G, M, ...] in position order."""
        tokens = self.inverse.shape[1]
        return gather_rows(compact_GxP[:, :tokens], self.inverse)


def _divisor_near_sqrt(n: int) -> int:
    """The divisor of n nearest sqrt(n) from below (1 for a prime)."""
    d = int(n ** 0.5)
    while n % d:
        d -= 1
    return d


def first_argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum). On CPU in two short
    passes (`_blocked_argmax`); elsewhere jnp.argmax itself: on TPU the blocked form made the
    compiled SFT step keep a copy of each logits chunk (the tiny model's v5p temp memory 17.0 ->
    26.1 MB, tests/test_plan.py), and accelerators reduce a long axis well. The choice is made
    when the step is lowered, so `jaxft plan` on a CPU host compiles TPU steps with jnp.argmax."""
    return jax.lax.platform_dependent(x, cpu=_blocked_argmax, default=_argmax)


def _argmax(x):
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def _blocked_argmax(x):
    """The maximum of each block of about sqrt(V) entries, the first block holding the overall
    maximum, then the first maximum inside that block. XLA:CPU lowers a direct argmax over a
    long axis as a scalar variadic reduce: 68 ms for [2,048, 8,192] float32 logits against
    4 ms this way (1.5 ms for a plain max)."""
    *lead, vocab = x.shape
    width = _divisor_near_sqrt(vocab)
    if width < 8:  # a prime-ish vocabulary: no useful blocks
        return _argmax(x)
    blocks = x.reshape(*lead, vocab // width, width)
    block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]
    return (block * width + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def chunk_logits(h_GxCxE, w_ExV, cap):
    # f32 accumulation so bf16 activations still give f32 logits, as the full path does.
    return softcap(jnp.einsum("gce,ev->gcv", h_GxCxE, w_ExV, preferred_element_type=jnp.float32), cap)
