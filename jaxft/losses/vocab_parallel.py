"""The chunked loss with the vocabulary split over devices (Megatron's vocab-parallel cross-entropy).

`chunked_token_logps(..., vocab_parallel=(row_axes, position_axes, embed_axes, vocab_axes))`
lands here (the mesh axis names that split hidden's B and L and lm_head's E and V): the same
numbers as `chunked.py`'s own path (value, gradients, argmax, vocabulary means), computed so
that no device ever holds the whole [E, V] output projection or its gradient:

- **Each device its vocabulary columns.** One all-to-all over the embed axes turns this
  device's [E / f, V / t] block of lm_head into [E, V / n] whole columns (n = f * t: every
  device that holds a part of lm_head). A chunk's logits are then those columns' only, for the
  chunk's tokens of every device along those axes (a [C, E] all-gather of hidden states); the
  softmax statistics combine across devices: max (pmax), sum of exponentials, target logit and
  logit sum (one psum), first argmax (pmin of candidate indices).
- **Gradients stay where they are made.** d(lm_head) accumulates into this device's [E, V / n]
  columns in float32, without communication, and goes back to lm_head's own [E / f, V / t]
  blocks once, at the end (all-to-all; an all-reduce over the batch axes lm_head is not split
  over, data parallelism's own). d(hidden) of the gathered tokens returns to the devices that
  own them, summed over the columns: a [C, E] reduce-scatter a chunk.

`chunked.py`'s path under the same mesh is partitioned by XLA, which all-gathers the whole
lm_head every chunk, forward and backward, and all-reduces a whole float32 d(lm_head) every
chunk: for Llama-3-8B on 4 v5p chips at 8,192 tokens a chip, 1 + 1 + 2 GiB, 64 times a step.

Axis legend as in chunked.py; T: the token groups one chunk gathers (devices along lm_head's
axes that hold different tokens), Vs: V / n, this device's columns.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import PartitionSpec as P

from jaxft.losses.chunk_plan import Plan, chunk_logits, gather_rows


class _Axes:
    """The mesh axes of one call (`axes` = (rows, positions, embed, vocab, vocab_major), see
    `vocab_parallel_logps`) and the roles they play."""

    def __init__(self, axes):
        self.rows, self.positions, self.embed, self.vocab, self.vocab_major = axes
        self.head = self.vocab + self.embed  # this order numbers the column blocks (see _to_columns)
        tokens = self.rows + self.positions
        self.gather = tuple(a for a in tokens if a in self.head)  # tokens one chunk brings together
        self.same_tokens = tuple(a for a in self.head if a not in self.gather)  # e.g. tensor
        self.same_columns = tuple(a for a in tokens if a not in self.head)  # e.g. data

    def specs(self):
        """PartitionSpecs: hidden [B, L, E], per-token [B, L], lm_head [E, V], its columns
        [E, V] (split as `_to_columns` leaves them) and compact per-device rows [G, P]."""
        tokens = P(_entry(self.rows), _entry(self.positions))
        return (P(*tokens, None), tokens, P(_entry(self.embed), _entry(self.vocab)), P(None, _entry(self.head)),
                P(_entry(self.rows + self.positions), None))


def _entry(axes):
    return axes[0] if len(axes) == 1 else (tuple(axes) or None)


def _to_columns(w_block, axes: _Axes):
    """This device's [E / f, V / t] block of lm_head -> [E, V / n] whole columns: column block
    (vocab index) * f + (embed index) of n."""
    return lax.all_to_all(w_block, axes.embed, split_axis=1, concat_axis=0, tiled=True) if axes.embed else w_block


def _to_blocks(w_columns, axes: _Axes):
    """Inverse of `_to_columns`."""
    return lax.all_to_all(w_columns, axes.embed, split_axis=0, concat_axis=1, tiled=True) if axes.embed else w_columns


def _statistics(logits_TxCxVs, t_TxC, offset, vocab: int, head_axes):
    """The whole vocabulary's log-sum-exp, target logit, first argmax and mean logit of each
    row, from this device's columns (from `offset` on) and the other devices'."""
    shard = logits_TxCxVs.shape[-1]
    local_max = jnp.max(logits_TxCxVs, axis=-1)
    top = lax.pmax(local_max, head_axes)
    local_t = t_TxC - offset
    picked = jnp.take_along_axis(logits_TxCxVs, jnp.clip(local_t, 0, shard - 1)[..., None], axis=-1)[..., 0]
    exp_sum, target_logit, logit_sum = lax.psum(
        (jnp.sum(jnp.exp(logits_TxCxVs - top[..., None]), axis=-1),
         jnp.where((local_t >= 0) & (local_t < shard), picked, 0.0), jnp.sum(logits_TxCxVs, axis=-1)), head_axes)
    # jnp.argmax takes the first maximum: the lowest index among the devices holding the max.
    candidate = jnp.where(local_max == top, jnp.argmax(logits_TxCxVs, axis=-1).astype(jnp.int32) + offset, vocab)
    return top + jnp.log(exp_sum), target_logit, lax.pmin(candidate, head_axes), logit_sum / vocab


def _local_setup(h_BxLxE, t_BxL, mask_BxL, w_ExVs, chunk, axes: _Axes):
    """Flattened rows, the plan of this device's tokens, the loop's trip count (the same on
    every device of a collective), the vocabulary size and this device's first column."""
    b, l, embed = h_BxLxE.shape
    h, t, mask = h_BxLxE.reshape(1, b * l, embed), t_BxL.reshape(1, b * l), mask_BxL.reshape(1, b * l)
    plan = Plan.of(mask, chunk)
    shard = w_ExVs.shape[1]
    offset = lax.axis_index(axes.head).astype(jnp.int32) * shard
    return h, t, plan, lax.pmax(plan.num_chunks, axes.head), shard * lax.axis_size(axes.head), offset


def _local_forward(h_BxLxE, w_block, t_BxL, mask_BxL, *, chunk, softcap, axes: _Axes):
    """One device's forward pass: its tokens' logps, correct, means [b, l], its columns of
    lm_head [E, Vs] and log-sum-exp [1, P] (compact order), both for the backward pass."""
    w_ExVs = _to_columns(w_block, axes)
    h, t, plan, num_chunks, vocab, offset = _local_setup(h_BxLxE, t_BxL, mask_BxL, w_ExVs, chunk, axes)
    me = lax.axis_index(axes.gather) if axes.gather else 0  # this device's block of the gathered rows
    zeros = jnp.zeros((1, plan.padded), jnp.float32)

    def body(carry):
        j, logps, lse, correct, means = carry
        index, valid = plan.slot(plan.order, j), plan.slot(plan.valid, j)
        h_TxCxE, t_TxC = gather_rows(h, index), gather_rows(t, index)
        if axes.gather:
            h_TxCxE, t_TxC = lax.all_gather((h_TxCxE, t_TxC), axes.gather, axis=0, tiled=True)
        stats = _statistics(chunk_logits(h_TxCxE, w_ExVs, softcap), t_TxC, offset, vocab, axes.head)
        chunk_lse, picked, argmax, mean = (lax.dynamic_index_in_dim(x, me, axis=0) for x in stats)
        hit = (argmax == lax.dynamic_index_in_dim(t_TxC, me, axis=0)) & valid
        put = functools.partial(lax.dynamic_update_slice_in_dim, start_index=j * chunk, axis=1)
        return (j + 1, put(logps, jnp.where(valid, picked - chunk_lse, 0.0)), put(lse, chunk_lse),
                put(correct, hit), put(means, jnp.where(valid, mean, 0.0)))

    init = (jnp.int32(0), zeros, zeros, jnp.zeros((1, plan.padded), bool), zeros)
    _, logps, lse, correct, means = lax.while_loop(lambda c: c[0] < num_chunks, body, init)
    return tuple(plan.scatter_back(x).reshape(t_BxL.shape) for x in (logps, correct, means)), w_ExVs, lse


def _local_backward(h_BxLxE, w_ExVs, t_BxL, mask_BxL, lse_1xP, g_logps_BxL, g_means_BxL, *, chunk, softcap,
                    axes: _Axes, head_grad: bool):
    """One device's backward pass: d(hidden) of its tokens, and d(lm_head) of its [E / f, V / t]
    block when `head_grad` (not for a frozen head: LoRA)."""
    h, t, plan, num_chunks, vocab, offset = _local_setup(h_BxLxE, t_BxL, mask_BxL, w_ExVs, chunk, axes)
    # Compact cotangents; positions without a target contribute nothing (their outputs are 0).
    g_logps, g_means = (jnp.where(plan.valid, gather_rows(g.reshape(t.shape), plan.order), 0.0)
                        for g in (g_logps_BxL, g_means_BxL))
    columns = (jnp.arange(w_ExVs.shape[1], dtype=jnp.int32) + offset)[None, None, :]

    def body(carry):
        j, dh, dw = carry
        index = plan.slot(plan.order, j)
        h_TxCxE, t_TxC = gather_rows(h, index), gather_rows(t, index)
        per_row = tuple(plan.slot(x, j) for x in (lse_1xP, g_logps, g_means))
        if axes.gather:
            h_TxCxE, t_TxC, per_row = lax.all_gather((h_TxCxE, t_TxC, per_row), axes.gather, axis=0, tiled=True)
        lse, gl, gm = (x[..., None] for x in per_row)
        logits = chunk_logits(h_TxCxE, w_ExVs, softcap)
        # d logp / d logits = onehot(t) - softmax; d mean / d logits = 1 / V.
        d_logits = jnp.where(columns == t_TxC[..., None], gl, 0.0) - gl * jnp.exp(logits - lse) + gm / vocab
        if softcap is not None:  # logits = cap * tanh(y / cap): dy = d_logits * (1 - (logits / cap)^2)
            d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
        d_logits = d_logits.astype(h_TxCxE.dtype)
        dh_TxCxE = jnp.einsum("tcv,ev->tce", d_logits, w_ExVs, preferred_element_type=jnp.float32)
        if axes.gather:  # each device's rows back to it, summed over the devices' columns
            dh_TxCxE = lax.psum_scatter(dh_TxCxE, axes.gather, scatter_dimension=0, tiled=True)
        if axes.same_tokens:  # and over the columns of the devices that hold the same tokens
            dh_TxCxE = lax.psum(dh_TxCxE, axes.same_tokens)
        if head_grad:
            dw = dw + jnp.einsum("tce,tcv->ev", h_TxCxE, d_logits, preferred_element_type=jnp.float32)
        return j + 1, lax.dynamic_update_slice_in_dim(dh, dh_TxCxE, j * chunk, axis=1), dw

    init = (jnp.int32(0), jnp.zeros((1, plan.padded, h.shape[2]), jnp.float32),
            jnp.zeros(w_ExVs.shape if head_grad else (), jnp.float32))
    _, dh, dw = lax.while_loop(lambda c: c[0] < num_chunks, body, init)
    dh = plan.scatter_back(dh).reshape(h_BxLxE.shape).astype(h_BxLxE.dtype)
    if not head_grad:
        return dh
    if axes.same_columns:  # the other devices' tokens, the same columns (data parallelism)
        dw = lax.psum(dw, axes.same_columns)
    # In lm_head's own memory order. Left to itself, XLA picks the order that makes the
    # all-to-all a copy-free concatenation (embed-minor for an [E, V] head) and carries it into
    # the optimizer update: copies of the float32 parameter and both AdamW moments (1.5 GiB on
    # Llama-3-8B, 4 chips; +0.36 GiB at the step's peak at 8,192 tokens a chip).
    order = (1, 0) if axes.vocab_major else (0, 1)
    return dh, with_layout_constraint(_to_blocks(dw.astype(w_ExVs.dtype), axes), Layout(major_to_minor=order))


def _shard_map(fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _forward(h, w, t, mask, chunk, softcap, axes):
    ax = _Axes(axes)
    hidden, token, head, columns, compact = ax.specs()
    local = functools.partial(_local_forward, chunk=chunk, softcap=softcap, axes=ax)
    outs, w_columns, lse = _shard_map(local, (hidden, head, token, token), ((token,) * 3, columns, compact))(
        h, w, t, mask)
    return outs, (h, w_columns, t, mask, lse)


def _forward_rule(h, w, t, mask, chunk, softcap, axes):
    # symbolic_zeros: each array comes with `perturbed`; a frozen lm_head (LoRA) gets no
    # gradient, and the backward pass then skips d(lm_head) (a marker in the residuals' structure).
    outs, residuals = _forward(h.value, w.value, t.value, mask.value, chunk, softcap, axes)
    return outs, (residuals, {"head_grad": ()} if w.perturbed else {})


def _backward(chunk, softcap, axes, residuals, cotangents):
    (h, w_columns, t, mask, lse), marker = residuals
    head_grad = "head_grad" in marker
    # `correct` is boolean: no cotangent; an output nothing reads (SFT's means) comes as a symbolic zero.
    g_logps, g_means = (jnp.zeros(t.shape, jnp.float32) if isinstance(g, SymbolicZero) else g
                        for g in (cotangents[0], cotangents[2]))
    ax = _Axes(axes)
    hidden, token, head, columns, compact = ax.specs()
    local = functools.partial(_local_backward, chunk=chunk, softcap=softcap, axes=ax, head_grad=head_grad)
    grads = _shard_map(local, (hidden, columns, token, token, compact, token, token),
                       (hidden, head) if head_grad else hidden)(h, w_columns, t, mask, lse, g_logps, g_means)
    dh, dw = grads if head_grad else (grads, None)
    return dh, dw, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def vocab_parallel_logps(h_BxLxE, w_ExV, t_BxL, mask_BxL, chunk: int, softcap, axes):
    """`chunked_token_logps`'s (logps, correct, means), each device computing its own columns
    of the vocabulary, under the ambient mesh (jax.set_mesh). axes: (row axes, position axes,
    embed axes, vocab axes, vocab_major): tuples of mesh axis names that split hidden's B and
    L and lm_head's E and V, and whether lm_head is stored vocabulary-major (the transpose of a
    [V, E] array: tied embeddings), the memory order its gradient is given in."""
    return _forward(h_BxLxE, w_ExV, t_BxL, mask_BxL, chunk, softcap, axes)[0]


vocab_parallel_logps.defvjp(_forward_rule, _backward, symbolic_zeros=True)


def tokens_per_device(shape, vocab: int, axes) -> int:
    """Tokens one device holds of a [B, L] batch under `axes` and the ambient mesh; ValueError
    without a mesh, or when the axes do not divide B, L or the vocabulary."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("chunked_token_logps(vocab_parallel=...) needs the ambient mesh (jax.set_mesh)")
    rows, positions, embed, columns = (math.prod(mesh.shape[a] for a in names) for names in axes[:4])
    if shape[0] % rows or shape[1] % positions or vocab % (embed * columns):
        raise ValueError(f"vocab_parallel={axes[:4]} splits [B, L] = {tuple(shape)} into {(rows, positions)} and "
                         f"the vocabulary ({vocab}) into {embed * columns}: each must divide")
    return shape[0] // rows * (shape[1] // positions)
