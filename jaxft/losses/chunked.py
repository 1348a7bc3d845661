"""Target log-probs straight from final hidden states, chunked over the trained tokens only.

`chunked_token_logps(hidden, lm_head, targets, target_mask, chunk_size=C)` equals
`full_token_logps(hidden @ lm_head, targets)` at every trained position (and is 0 elsewhere),
in value and gradients, without ever holding more than one chunk of logits:

- **Only trained tokens.** Positions are reordered so those with a target come first (a stable
  sort of the mask); the chunk loop runs `ceil(targets / C)` times, a count known only on the
  device (`lax.while_loop`). A prompt-heavy SFT batch, a DPO batch or right-padded rows then
  cost logits only where there is a loss, and no row is padded to a chunk.
- **O(C x V) logits whatever B and L.** A chunk is C tokens of each group (below), forward
  and backward.
- **Gradients chunk by chunk** (Cut Cross-Entropy, Wijmans et al. 2024; Liger Kernel's fused
  linear cross-entropy): a `custom_vjp` whose backward pass recomputes each chunk's logits from
  the saved log-sum-exp and adds that chunk's share to d(hidden) and d(lm_head); no [tokens, V]
  array is stored between the passes. (The loop's trip count is dynamic, so autodiff could not
  transpose it: the backward pass is written out.)
- **Groups stay on their device.** `groups=(row_groups, seq_groups)` splits [B, L] into blocks
  of rows x positions that are compacted and chunked independently: pass the number of devices
  rows and positions are split over (data x fsdp, and sequence under context parallelism) and
  each device sorts, gathers and computes only its own tokens. Any grouping gives the same
  numbers; it only decides where the work happens.
- **The vocabulary split over devices** (`vocab_parallel=`, under a mesh that splits lm_head):
  each device computes its own columns of every chunk's logits and keeps its own columns of
  d(lm_head); `vocab_parallel.py`. Without it, XLA partitions this file's loop by itself, which
  under FSDP all-gathers the whole lm_head and all-reduces a whole d(lm_head) every chunk.

Axis legend: B rows, L sequence, E embedding, V vocabulary, G groups, M tokens per group,
C tokens per chunk and group, P padded compact length (a multiple of C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxft.losses.chunk_plan import Plan, chunk_logits, first_argmax, gather_rows

# train.loss_chunk_size = -1: chunks sized so that one chunk's f32 logits (per device) take about
# this many bytes: ~64 MiB, 128 tokens at a 128k vocabulary, 512 at 32k (jaxft bench measures).
AUTO_LOGITS_BYTES = 64 * 2**20
AUTO_CHUNK_RANGE = (128, 2048)  # tokens: big enough for matmul efficiency, small enough for memory


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for `train.loss_chunk_size = -1`: ~AUTO_LOGITS_BYTES of f32 logits, a
    multiple of 128, within AUTO_CHUNK_RANGE."""
    low, high = AUTO_CHUNK_RANGE
    tokens = AUTO_LOGITS_BYTES // (4 * vocab_size) // 128 * 128
    return int(min(high, max(low, tokens)))


def resolve_chunk_size(setting: int, vocab_size: int) -> int:
    """`train.loss_chunk_size` as the steps use it: > 0 as given, 0 (whole logits), -1 auto."""
    return auto_chunk_size(vocab_size) if setting < 0 else setting


def _to_groups(x, row_groups: int, seq_groups: int):
    """[B, L, ...] -> [G, M, ...]: group (i, j) holds row block i, position block j, row-major."""
    b, l, rest = x.shape[0], x.shape[1], x.shape[2:]
    x = x.reshape((row_groups, b // row_groups, seq_groups, l // seq_groups) + rest)
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape((row_groups * seq_groups, (b // row_groups) * (l // seq_groups)) + rest)


def _from_groups(x, row_groups: int, seq_groups: int, b: int, l: int):
    """Inverse of `_to_groups`: [G, M, ...] -> [B, L, ...]."""
    rest = x.shape[2:]
    x = x.reshape((row_groups, seq_groups, b // row_groups, l // seq_groups) + rest)
    return jnp.swapaxes(x, 1, 2).reshape((b, l) + rest)


def _forward(h_GxMxE, w_ExV, t_GxM, mask_GxM, chunk, softcap):
    plan = Plan.of(mask_GxM, chunk)
    groups = mask_GxM.shape[0]
    zeros = jnp.zeros((groups, plan.padded), jnp.float32)

    def body(carry):
        j, logps, lse, correct, means = carry
        index, valid = plan.slot(plan.order, j), plan.slot(plan.valid, j)
        logits = chunk_logits(gather_rows(h_GxMxE, index), w_ExV, softcap)
        t = gather_rows(t_GxM, index)
        chunk_lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        hit = (first_argmax(logits) == t) & valid
        put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=j * chunk, axis=1)
        return (j + 1, put(logps, jnp.where(valid, picked - chunk_lse, 0.0)), put(lse, chunk_lse),
                put(correct, hit), put(means, jnp.where(valid, jnp.mean(logits, axis=-1), 0.0)))

    init = (jnp.int32(0), zeros, zeros, jnp.zeros((groups, plan.padded), bool), zeros)
    _, logps, lse, correct, means = jax.lax.while_loop(lambda c: c[0] < plan.num_chunks, body, init)
    outs = tuple(plan.scatter_back(x) for x in (logps, correct, means))
    return outs, (h_GxMxE, w_ExV, t_GxM, plan.arrays(), lse)


def _backward(chunk, softcap, residuals, cotangents):
    h_GxMxE, w_ExV, t_GxM, plan_arrays, lse_GxP = residuals
    g_logps, _, g_means = cotangents  # `correct` is boolean: no cotangent
    plan = Plan(*plan_arrays, chunk=chunk)
    vocab = w_ExV.shape[1]
    # Compact cotangents; positions without a target contribute nothing (their outputs are 0).
    g_logps = jnp.where(plan.valid, gather_rows(g_logps, plan.order), 0.0)
    g_means = jnp.where(plan.valid, gather_rows(g_means, plan.order), 0.0)
    groups, _, embed = h_GxMxE.shape

    def body(carry):
        j, dh, dw = carry
        index = plan.slot(plan.order, j)
        h = gather_rows(h_GxMxE, index)
        logits = chunk_logits(h, w_ExV, softcap)
        t = gather_rows(t_GxM, index)
        gl, gm = plan.slot(g_logps, j)[..., None], plan.slot(g_means, j)[..., None]
        # d logp / d logits = onehot(t) - softmax; d mean / d logits = 1 / V.
        probs = jnp.exp(logits - plan.slot(lse_GxP, j)[..., None])
        onehot = jnp.arange(vocab, dtype=t.dtype)[None, None, :] == t[..., None]
        d_logits = jnp.where(onehot, gl, 0.0) - gl * probs + gm / vocab
        if softcap is not None:  # logits = cap * tanh(y / cap): dy = d_logits * (1 - (logits / cap)^2)
            d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
        d_logits = d_logits.astype(h.dtype)
        dh_chunk = jnp.einsum("gcv,ev->gce", d_logits, w_ExV, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("gce,gcv->ev", h, d_logits, preferred_element_type=jnp.float32)
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_chunk, j * chunk, axis=1)
        return j + 1, dh, dw

    init = (jnp.int32(0), jnp.zeros((groups, plan.padded, embed), jnp.float32),
            jnp.zeros(w_ExV.shape, jnp.float32))
    _, dh, dw = jax.lax.while_loop(lambda c: c[0] < plan.num_chunks, body, init)
    return plan.scatter_back(dh).astype(h_GxMxE.dtype), dw.astype(w_ExV.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_logps(h_GxMxE, w_ExV, t_GxM, mask_GxM, chunk, softcap):
    return _forward(h_GxMxE, w_ExV, t_GxM, mask_GxM, chunk, softcap)[0]


_grouped_logps.defvjp(_forward, _backward)


def chunked_token_logps(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    target_mask: jax.Array,
    *,
    chunk_size: int,
    groups: tuple[int, int] = (1, 1),
    logit_softcap: float | None = None,
    vocab_parallel: tuple[tuple[str, ...], ...] | None = None,
    lm_head_vocab_major: bool = False,
):
    """Target log-probs of the trained positions, from final hidden states, in token chunks.

    Args:
      hidden: [B, L, E] final (normed) hidden states, any float dtype.
      lm_head: [E, V] output projection (the transposed embedding when tied), same dtype.
      targets: int [B, L] (from `shift_targets`).
      target_mask: [B, L], 1 where `targets` is trained (from `shift_targets`); only those
        positions are computed.
      chunk_size: C > 0, tokens per chunk (per group): the logits held at once are [G, C, V],
        [C, V] per device when the groups are the devices.
      groups: (row groups, position groups) dividing B and L: see the module docstring.
      logit_softcap: optional soft cap, cap * tanh(logits / cap), before the softmax.
      vocab_parallel: None, or (row axes, position axes, embed axes, vocab axes): the mesh
        axis names that split hidden's B and L and lm_head's E and V
        (`jaxft.parallel.sharding.vocab_parallel_axes`); then each device computes only its
        columns of the logits and of d(lm_head) (`vocab_parallel.py`) under the ambient mesh,
        and `groups` is not used. Same numbers either way.
      lm_head_vocab_major: with vocab_parallel, whether lm_head is stored vocabulary-major (the
        transpose of a [V, E] array: tied embeddings), so its gradient is laid out the same.

    Returns:
      logps float32 [B, L], correct bool [B, L] (argmax == target) and mean_logits float32
      [B, L] (the logits' mean over the vocabulary, for TRL's logits/chosen, logits/rejected):
      each as `full_token_logps` / `logits.mean(-1)` give them at trained positions, 0 (False)
      at the others. Differentiable in `hidden` and `lm_head` (through logps and mean_logits).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    b, l, _ = hidden.shape
    if vocab_parallel is not None:
        from jaxft.losses.vocab_parallel import tokens_per_device, vocab_parallel_logps

        axes = tuple(tuple(a) for a in vocab_parallel) + (bool(lm_head_vocab_major),)
        chunk = min(chunk_size, tokens_per_device((b, l), lm_head.shape[1], axes))
        return vocab_parallel_logps(hidden, lm_head, targets.astype(jnp.int32), target_mask, chunk, logit_softcap,
                                    axes)
    row_groups, seq_groups = groups
    if b % row_groups or l % seq_groups:
        raise ValueError(f"groups {groups} must divide the batch's rows and positions {(b, l)}")
    to_groups = functools.partial(_to_groups, row_groups=row_groups, seq_groups=seq_groups)
    tokens_per_group = (b // row_groups) * (l // seq_groups)
    chunk = min(chunk_size, tokens_per_group)
    outs = _grouped_logps(to_groups(hidden), lm_head, to_groups(targets.astype(jnp.int32)),
                          to_groups(target_mask), chunk, logit_softcap)
    return tuple(_from_groups(x, row_groups, seq_groups, b, l) for x in outs)
