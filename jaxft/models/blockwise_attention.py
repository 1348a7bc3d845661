"""The `blockwise` attention backend: flash attention in plain JAX, any platform, any length.

Online softmax over key blocks, with a custom VJP (FlashAttention-2's backward) that recomputes
scores block by block; key blocks outside causality or the sliding window are skipped. The mask
rule and the optional logit soft-cap are `jaxft.models.attention`'s. Axis letters as there: B batch, L / S query / key length,
H query heads, K kv heads, G query heads per kv head, D head dim; N / M query / key blocks of
T / C positions each (L padded to N * T, S to M * C).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxft.models.attention_mask import MASKED, AttentionMask, allowed


def _kv_range(n, T, C, M, q_offset, window):
    """Key blocks [lo, hi) that query block n can see: later ones are causally out, earlier ones
    out of the window. Traced bounds (q_offset may be a cache index): fori_loop becomes a while."""
    first_q = q_offset + n * T
    hi = jnp.minimum(M, (first_q + T - 1) // C + 1)
    lo = 0 if not window else jnp.clip((first_q - window + 1) // C, 0, hi)
    return lo, hi


def _block(q_BKGTD, k_MBKCD, qseg_BT, kvseg_MBC, n, m, q_offset, window, softcap):
    """f32 scores [B, K, G, T, C] of query block n against key block m (soft-capped when softcap
    is set), their mask, and d(capped)/d(scaled) = 1 - tanh^2 for the backward (None: no cap)."""
    T, C, D = q_BKGTD.shape[3], k_MBKCD.shape[3], q_BKGTD.shape[4]
    k_BKCD = lax.dynamic_index_in_dim(k_MBKCD, m, 0, keepdims=False)
    kvseg_BC = lax.dynamic_index_in_dim(kvseg_MBC, m, 0, keepdims=False)
    s = jnp.einsum("BKGTD,BKCD->BKGTC", q_BKGTD, k_BKCD, preferred_element_type=jnp.float32)
    q_idx_T = q_offset + n * T + jnp.arange(T)
    ok_BTC = allowed(qseg_BT, kvseg_BC, q_idx_T, m * C + jnp.arange(C), window)
    # The mask before the scaling: without a cap, the program is the one before soft-capping
    # existed (its compiled form stays cached).
    s = s / math.sqrt(D)
    dcap = None
    if softcap:
        t = jnp.tanh(s / softcap)
        s, dcap = softcap * t, 1.0 - t * t
    return s, ok_BTC[:, None, None], dcap


def _flash_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap):
    """q [N, B, K, G, T, D], k/v [M, B, K, C, D], segments [N, B, T] / [M, B, C].
    Returns out (q's layout and dtype) and the f32 log-sum-exp [N, B, K, G, T] per query."""
    N, B, K, G, T, D = q.shape
    M, C = k.shape[0], k.shape[3]

    def q_block(_, xs):
        q_i, qseg_i, n = xs

        def kv_step(m, carry):
            mx, l, acc = carry  # running max, softmax denominator, unnormalised output (all f32)
            s, ok, _ = _block(q_i, k, qseg_i, kvseg, n, m, q_offset, window, softcap)
            s = jnp.where(ok, s, MASKED)
            mx_new = jnp.maximum(mx, jnp.max(s, axis=-1))
            # where(), not the finite fill alone: a row masked so far has mx == MASKED, and
            # exp(MASKED - MASKED) = 1 would count masked keys.
            p = jnp.where(ok, jnp.exp(s - mx_new[..., None]), 0.0)
            alpha = jnp.exp(mx - mx_new)
            v_BKCD = lax.dynamic_index_in_dim(v, m, 0, keepdims=False)
            pv = jnp.einsum("BKGTC,BKCD->BKGTD", p.astype(v.dtype), v_BKCD,
                            preferred_element_type=jnp.float32)
            return mx_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full((B, K, G, T), MASKED, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
                jnp.zeros((B, K, G, T, D), jnp.float32))
        lo, hi = _kv_range(n, T, C, M, q_offset, window)
        mx, l, acc = lax.fori_loop(lo, hi, kv_step, init)
        safe_l = jnp.where(l > 0, l, 1.0)  # l == 0: no allowed key (padding query) -> output 0
        # float32 out of the scan, cast once after it: XLA:CPU writes a bfloat16 block into the
        # scan's stacked output by converting the whole buffer to float32 and back each block.
        out = acc / safe_l[..., None]
        return None, (out, jnp.where(l > 0, mx + jnp.log(safe_l), 0.0))

    _, (out, lse) = lax.scan(q_block, None, (q, qseg, jnp.arange(N)))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, qseg, kvseg, q_offset, window, softcap):
    return _flash_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap)[0]


def _flash_vjp_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap):
    out, lse = _flash_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap)
    # Residuals are O(L * D): inputs, output and one f32 per query; no scores are kept.
    return out, (q, k, v, qseg, kvseg, q_offset, out, lse)


def _flash_vjp_bwd(window, softcap, res, do, dlse=None):
    """FlashAttention-2 backward in one sweep: per query block, recompute p block by block,
    accumulate dq for the block and add into full-size f32 dk / dv carried across blocks.
    dlse: the cotangent of the log-sum-exp (`_flash_lse`), None when only `out` is used."""
    q, k, v, qseg, kvseg, q_offset, out, lse = res
    N, B, K, G, T, D = q.shape
    M, C = k.shape[0], k.shape[3]
    # delta = rowsum(dO * O) = rowsum(P * dP), which the softmax gradient subtracts.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    if dlse is not None:  # d lse / d scores = P: the scores' gradient gains P * dlse
        delta = delta - dlse

    def q_block(carry, xs):
        q_i, do_i, lse_i, delta_i, qseg_i, n = xs

        def kv_step(m, c):
            dq_i, dk, dv = c
            s, ok, dcap = _block(q_i, k, qseg_i, kvseg, n, m, q_offset, window, softcap)
            p = jnp.exp(jnp.where(ok, s - lse_i[..., None], -jnp.inf))
            k_BKCD = lax.dynamic_index_in_dim(k, m, 0, keepdims=False)
            v_BKCD = lax.dynamic_index_in_dim(v, m, 0, keepdims=False)
            dp = jnp.einsum("BKGTD,BKCD->BKGTC", do_i, v_BKCD, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])  # w.r.t. the (capped) scores
            if dcap is not None:  # through cap * tanh(s / cap)
                ds = ds * dcap
            ds = ds / math.sqrt(D)
            dq_i = dq_i + jnp.einsum("BKGTC,BKCD->BKGTD", ds.astype(k.dtype), k_BKCD,
                                     preferred_element_type=jnp.float32)
            # GQA: a kv head's gradient sums over its G query heads.
            dk_m = jnp.einsum("BKGTC,BKGTD->BKCD", ds.astype(q.dtype), q_i, preferred_element_type=jnp.float32)
            dv_m = jnp.einsum("BKGTC,BKGTD->BKCD", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32)
            dk = lax.dynamic_update_index_in_dim(dk, lax.dynamic_index_in_dim(dk, m, 0) + dk_m[None], m, 0)
            dv = lax.dynamic_update_index_in_dim(dv, lax.dynamic_index_in_dim(dv, m, 0) + dv_m[None], m, 0)
            return dq_i, dk, dv

        lo, hi = _kv_range(n, T, C, M, q_offset, window)
        dq_i, dk, dv = lax.fori_loop(lo, hi, kv_step, (jnp.zeros(q_i.shape, jnp.float32), *carry))
        return (dk, dv), dq_i

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(q_block, (zeros_kv, zeros_kv), (q, do, lse, delta, qseg, jnp.arange(N)))
    # Segment ids and q_offset are integers: no cotangent (None = zero).
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash_lse(q, k, v, qseg, kvseg, q_offset, window, softcap):
    """`_flash` that also returns the log-sum-exp per query, differentiably (attention sinks
    rescale the output by it); a function of its own so `_flash`'s program stays as it was."""
    return _flash_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap)


def _flash_lse_vjp_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap):
    out, lse = _flash_fwd(q, k, v, qseg, kvseg, q_offset, window, softcap)
    return (out, lse), (q, k, v, qseg, kvseg, q_offset, out, lse)


def _flash_lse_vjp_bwd(window, softcap, res, cotangents):
    do, dlse = cotangents
    return _flash_vjp_bwd(window, softcap, res, do, dlse)


_flash_lse.defvjp(_flash_lse_vjp_fwd, _flash_lse_vjp_bwd)


# blockwise tiles (block_q, block_k) when none are given. XLA:CPU runs small ones fastest: on the
# bench shapes (B 8, H 8, K 4, D 32), forward + backward with 32 x 64 took 0.64 / 0.63 / 0.64x the
# time of 128 x 128 at 256 / 1,024 / 2,048 tokens (64 x 64: 0.67 / 0.76 / 0.77x). Accelerators,
# where blockwise is only splash's fallback, want wide tiles.
CPU_BLOCKS, WIDE_BLOCKS = (32, 64), (128, 128)


def default_blocks(platform: str | None = None) -> tuple[int, int]:
    """(block_q, block_k) for `platform` (default: jax.default_backend())."""
    return CPU_BLOCKS if (platform or jax.default_backend()) == "cpu" else WIDE_BLOCKS


def blockwise(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None,
              logit_softcap=None, sinks_H=None):
    """Memory-lean flash attention in plain JAX: [B, L, H, D] in q's dtype.

    Forward and backward each hold one [B, K, G, block_q, block_k] f32 score block at a time
    (plus O((L + S) D) residuals and f32 dk / dv); compile time does not grow with L (a scan over
    query blocks, a fori_loop over the key blocks each one can see). L and S are padded up to
    block multiples here (padding keys get segment 0, padding queries are dropped); blocks
    shrink to L / S when those are shorter (decode: block_q = L). None: `default_blocks()`.
    logit_softcap: None, or a Python float c (static): scores become c * tanh(scores / c) before
    the mask, and the backward goes through the tanh.
    sinks_H: None, or [H] sink logits (gpt-oss): the output over the keys times
    sigmoid(lse - sink), lse the log-sum-exp of the allowed scores, which is the softmax with the
    sink in its denominator; gradients reach the sinks and, through lse, the scores.
    """
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    default_q, default_k = default_blocks()
    T, C = min(block_q or default_q, L), min(block_k or default_k, S)
    N, M = -(-L // T), -(-S // C)

    def pad(x, length):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    # Block index leading, so the loops index blocks with a cheap dynamic slice.
    q_NBKGTD = pad(q_BLHD, N * T).reshape(B, N, T, K, G, D).transpose(1, 0, 3, 4, 2, 5)
    k_MBKCD = pad(k_BSKD.astype(q_BLHD.dtype), M * C).reshape(B, M, C, K, D).transpose(1, 0, 3, 2, 4)
    v_MBKCD = pad(v_BSKD, M * C).reshape(B, M, C, K, D).transpose(1, 0, 3, 2, 4)
    qseg_NBT = pad(mask.q_segment_ids_BL.astype(jnp.int32), N * T).reshape(B, N, T).transpose(1, 0, 2)
    kvseg_MBC = pad(mask.kv_segment_ids_BS.astype(jnp.int32), M * C).reshape(B, M, C).transpose(1, 0, 2)
    args = (q_NBKGTD, k_MBKCD, v_MBKCD, qseg_NBT, kvseg_MBC, jnp.asarray(mask.q_offset, jnp.int32),
            mask.sliding_window or None, logit_softcap or None)
    if sinks_H is None:
        out_NBKGTD = _flash(*args)
    else:
        out_NBKGTD, lse_NBKGT = _flash_lse(*args)
        sinks_KG = sinks_H.astype(jnp.float32).reshape(K, G)
        # a query with no allowed key has out 0 (and lse 0): it stays 0
        keep_NBKGT = jax.nn.sigmoid(lse_NBKGT - sinks_KG[None, None, :, :, None])
        out_NBKGTD = (out_NBKGTD.astype(jnp.float32) * keep_NBKGT[..., None]).astype(q_BLHD.dtype)
    out_BLHD = out_NBKGTD.transpose(1, 0, 4, 2, 3, 5).reshape(B, N * T, H, D)[:, :L]
    return out_BLHD.astype(q_BLHD.dtype)
