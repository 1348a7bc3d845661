"""Attention backends behind one function, `attend`, all with the mask of `llama.Attention`.

Axis letters as in llama.py: B batch, L query length, S key length, H query heads, K key/value
heads, G query heads per kv head (H = K * G), D head dim. The blockwise kernel adds N / M query /
key blocks of T / C positions each (L padded to N * T, S to M * C).

The mask, the same for every backend: query l (at index q_offset + l) may attend to key s iff
  s <= q_offset + l                          causal by index within a row (segments are contiguous)
  q_offset + l - s < sliding_window          only when a window is set
  q_segment_ids[l] == kv_segment_ids[s] != 0 same packed segment, and never a padding key.
Softmax runs in float32. A query row with no allowed key (a padding query) gives finite output in
forward and gradient, but its value is the backend's own (reference / xla: the mean of v over all
keys; blockwise: 0; splash: attention over the padding keys): losses must mask those rows.

Backends (`BACKENDS[name]`, picked by `resolve`; "auto" = splash on TPU, cudnn on GPU, else
blockwise):
  reference  the einsum math llama.py has today; materialises [B, K, G, L, S] scores. The oracle.
  blockwise  pure-JAX flash attention: online softmax over key blocks, custom VJP recomputing per
             block, key blocks outside causality / the window skipped. Any platform, any length.
  xla/cudnn  `jax.nn.dot_product_attention` with a [B, 1, L, S] boolean mask (cudnn: GPU only,
             and cuDNN's own limits: bf16 / fp16 inputs, supported head dims).
  splash     the Pallas TPU splash kernel (q_offset == 0, L == S, L % 128 == 0; else blockwise),
             run per shard under the ambient mesh (`jax.set_mesh`): Mosaic cannot be auto-sharded.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxft.errors import ConfigError
from jaxft.models import context_parallel
from jaxft.parallel.sharding import logical_to_spec

_MASKED = float(np.finfo(np.float32).min)  # finite, so fully-masked rows stay NaN-free (as llama.py)


class AttentionMask(NamedTuple):
    """Who may attend to whom (see the module docstring for the rule).

    q_segment_ids_BL / kv_segment_ids_BS: int [B, L] / [B, S]; 0 = padding (never attended to).
    q_offset: index of the first query among the keys (KV-cache decoding); int or int32 scalar.
    sliding_window: None, or a query at index i sees keys j with i - j < sliding_window.
    """

    q_segment_ids_BL: jax.Array
    kv_segment_ids_BS: jax.Array
    q_offset: int | jax.Array = 0
    sliding_window: int | None = None


def _allowed(q_seg_BL, kv_seg_BS, q_idx_L, k_idx_S, window) -> jax.Array:
    """[B, L, S] booleans: the mask rule for queries at indices q_idx_L against keys at k_idx_S."""
    allowed_LS = q_idx_L[:, None] >= k_idx_S[None, :]
    if window:
        allowed_LS &= q_idx_L[:, None] - k_idx_S[None, :] < window
    same_segment_BLS = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
    return allowed_LS[None] & same_segment_BLS & (kv_seg_BS[:, None, :] != 0)


def _static_zero(x) -> bool:
    """True when q_offset is known at trace time to be 0 (not a traced cache index)."""
    return isinstance(x, (int, np.integer)) and int(x) == 0


# --- reference -------------------------------------------------------------------------------


def reference(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None):
    """llama.py's einsum attention, kept verbatim as the oracle: [B, L, H, D] in q's dtype."""
    del block_q, block_k  # one signature for every backend
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_idx_L = mask.q_offset + jnp.arange(L)
    allowed_BLS = _allowed(mask.q_segment_ids_BL, mask.kv_segment_ids_BS, q_idx_L, jnp.arange(S),
                           mask.sliding_window)
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, D)
    scores = jnp.einsum("BLKGD,BSKD->BKGLS", q_BLKGD, k_BSKD.astype(q_BLKGD.dtype))
    scores = scores.astype(jnp.float32) / math.sqrt(D)
    scores = jnp.where(allowed_BLS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    out_BLKGD = jnp.einsum("BKGLS,BSKD->BLKGD", probs, v_BSKD).astype(q_BLHD.dtype)
    return out_BLKGD.reshape(B, L, H, D)


# --- blockwise (flash attention in plain JAX) --------------------------------------------------


def _kv_range(n, T, C, M, q_offset, window):
    """Key blocks [lo, hi) that query block n can see: later ones are causally out, earlier ones
    out of the window. Traced bounds (q_offset may be a cache index): fori_loop becomes a while."""
    first_q = q_offset + n * T
    hi = jnp.minimum(M, (first_q + T - 1) // C + 1)
    lo = 0 if not window else jnp.clip((first_q - window + 1) // C, 0, hi)
    return lo, hi


def _block(q_BKGTD, k_MBKCD, qseg_BT, kvseg_MBC, n, m, q_offset, window):
    """f32 scores [B, K, G, T, C] of query block n against key block m, and their mask."""
    T, C, D = q_BKGTD.shape[3], k_MBKCD.shape[3], q_BKGTD.shape[4]
    k_BKCD = lax.dynamic_index_in_dim(k_MBKCD, m, 0, keepdims=False)
    kvseg_BC = lax.dynamic_index_in_dim(kvseg_MBC, m, 0, keepdims=False)
    s = jnp.einsum("BKGTD,BKCD->BKGTC", q_BKGTD, k_BKCD, preferred_element_type=jnp.float32)
    q_idx_T = q_offset + n * T + jnp.arange(T)
    ok_BTC = _allowed(qseg_BT, kvseg_BC, q_idx_T, m * C + jnp.arange(C), window)
    return s / math.sqrt(D), ok_BTC[:, None, None]


def _flash_fwd(q, k, v, qseg, kvseg, q_offset, window):
    """q [N, B, K, G, T, D], k/v [M, B, K, C, D], segments [N, B, T] / [M, B, C].
    Returns out (q's layout and dtype) and the f32 log-sum-exp [N, B, K, G, T] per query."""
    N, B, K, G, T, D = q.shape
    M, C = k.shape[0], k.shape[3]

    def q_block(_, xs):
        q_i, qseg_i, n = xs

        def kv_step(m, carry):
            mx, l, acc = carry  # running max, softmax denominator, unnormalised output (all f32)
            s, ok = _block(q_i, k, qseg_i, kvseg, n, m, q_offset, window)
            s = jnp.where(ok, s, _MASKED)
            mx_new = jnp.maximum(mx, jnp.max(s, axis=-1))
            # where(), not the finite fill alone: a row masked so far has mx == _MASKED, and
            # exp(_MASKED - _MASKED) = 1 would count masked keys.
            p = jnp.where(ok, jnp.exp(s - mx_new[..., None]), 0.0)
            alpha = jnp.exp(mx - mx_new)
            v_BKCD = lax.dynamic_index_in_dim(v, m, 0, keepdims=False)
            pv = jnp.einsum("BKGTC,BKCD->BKGTD", p.astype(v.dtype), v_BKCD,
                            preferred_element_type=jnp.float32)
            return mx_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full((B, K, G, T), _MASKED, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
                jnp.zeros((B, K, G, T, D), jnp.float32))
        lo, hi = _kv_range(n, T, C, M, q_offset, window)
        mx, l, acc = lax.fori_loop(lo, hi, kv_step, init)
        safe_l = jnp.where(l > 0, l, 1.0)  # l == 0: no allowed key (padding query) -> output 0
        out = (acc / safe_l[..., None]).astype(q.dtype)
        return None, (out, jnp.where(l > 0, mx + jnp.log(safe_l), 0.0))

    _, (out, lse) = lax.scan(q_block, None, (q, qseg, jnp.arange(N)))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, qseg, kvseg, q_offset, window):
    return _flash_fwd(q, k, v, qseg, kvseg, q_offset, window)[0]


def _flash_vjp_fwd(q, k, v, qseg, kvseg, q_offset, window):
    out, lse = _flash_fwd(q, k, v, qseg, kvseg, q_offset, window)
    # Residuals are O(L * D): inputs, output and one f32 per query; no scores are kept.
    return out, (q, k, v, qseg, kvseg, q_offset, out, lse)


def _flash_vjp_bwd(window, res, do):
    """FlashAttention-2 backward in one sweep: per query block, recompute p block by block,
    accumulate dq for the block and add into full-size f32 dk / dv carried across blocks."""
    q, k, v, qseg, kvseg, q_offset, out, lse = res
    N, B, K, G, T, D = q.shape
    M, C = k.shape[0], k.shape[3]
    # delta = rowsum(dO * O) = rowsum(P * dP), which the softmax gradient subtracts.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def q_block(carry, xs):
        q_i, do_i, lse_i, delta_i, qseg_i, n = xs

        def kv_step(m, c):
            dq_i, dk, dv = c
            s, ok = _block(q_i, k, qseg_i, kvseg, n, m, q_offset, window)
            p = jnp.exp(jnp.where(ok, s - lse_i[..., None], -jnp.inf))
            k_BKCD = lax.dynamic_index_in_dim(k, m, 0, keepdims=False)
            v_BKCD = lax.dynamic_index_in_dim(v, m, 0, keepdims=False)
            dp = jnp.einsum("BKGTD,BKCD->BKGTC", do_i, v_BKCD, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) / math.sqrt(D)
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


# blockwise tiles (block_q, block_k) when none are given. XLA:CPU runs small ones fastest: on the
# bench shapes (B 8, H 8, K 4, D 32), forward + backward with 32 x 64 took 0.64 / 0.63 / 0.64x the
# time of 128 x 128 at 256 / 1,024 / 2,048 tokens (64 x 64: 0.67 / 0.76 / 0.77x). Accelerators,
# where blockwise is only splash's fallback, want wide tiles.
CPU_BLOCKS, WIDE_BLOCKS = (32, 64), (128, 128)


def default_blocks(platform: str | None = None) -> tuple[int, int]:
    """(block_q, block_k) for `platform` (default: jax.default_backend())."""
    return CPU_BLOCKS if (platform or jax.default_backend()) == "cpu" else WIDE_BLOCKS


def blockwise(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None):
    """Memory-lean flash attention in plain JAX: [B, L, H, D] in q's dtype.

    Forward and backward each hold one [B, K, G, block_q, block_k] f32 score block at a time
    (plus O((L + S) D) residuals and f32 dk / dv); compile time does not grow with L (a scan over
    query blocks, a fori_loop over the key blocks each one can see). L and S are padded up to
    block multiples here (padding keys get segment 0, padding queries are dropped); blocks
    shrink to L / S when those are shorter (decode: block_q = L). None: `default_blocks()`.
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
    out_NBKGTD = _flash(q_NBKGTD, k_MBKCD, v_MBKCD, qseg_NBT, kvseg_MBC,
                        jnp.asarray(mask.q_offset, jnp.int32), mask.sliding_window or None)
    out_BLHD = out_NBKGTD.transpose(1, 0, 4, 2, 3, 5).reshape(B, N * T, H, D)[:, :L]
    return out_BLHD.astype(q_BLHD.dtype)


# --- jax.nn.dot_product_attention (xla, cudnn) ---------------------------------------------------


def _dot_product(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, implementation, block_q=None,
                 block_k=None):
    """`jax.nn.dot_product_attention` with the whole rule as a [B, 1, L, S] boolean mask.

    cudnn turns that mask into a [B, 1, L, S] bias (O(B L S) memory, but not per head) and runs
    its fused kernel; xla is the same call on any platform (it materialises the scores).
    """
    del block_q, block_k
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    allowed_BLS = _allowed(mask.q_segment_ids_BL, mask.kv_segment_ids_BS, mask.q_offset + jnp.arange(L),
                           jnp.arange(S), mask.sliding_window)
    # The mask already holds causality and the window; also stating them lets cuDNN skip the
    # masked-out tiles. Only when its top-left-aligned causal mask is ours: no offset, L == S.
    causal = _static_zero(mask.q_offset) and L == S
    window = (mask.sliding_window - 1, 0) if causal and mask.sliding_window else None
    out = jax.nn.dot_product_attention(
        q_BLHD, k_BSKD.astype(q_BLHD.dtype), v_BSKD.astype(q_BLHD.dtype), mask=allowed_BLS[:, None],
        is_causal=causal, local_window_size=window, implementation=implementation,
    )
    return out.astype(q_BLHD.dtype)


# --- splash (Pallas TPU kernel) ------------------------------------------------------------------


def _splash_kernel(L: int, G: int, window: int | None, interpret: bool, q_seq_shards: int = 1):
    """A GQA splash kernel for one (row, kv head): q [G, L, D], k / v [L, D] -> [G, L, D]
    (q_seq_shards > 1: its mask tables split by query block, for context parallelism).

    Built per trace, not cached here: the factory stages its mask tables as arrays of the
    current trace. The costly part (numpy mask processing) is cached inside splash, by mask."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    # LocalMask with no right side is causal, so a window needs no CausalMask beside it.
    one = (sm.LocalMask((L, L), window_size=(window - 1, 0), offset=0) if window
           else sm.CausalMask((L, L)))
    # Tile by 128 lanes, at most 512, dividing each query shard's length.
    block = next(b for b in (512, 256, 128) if (L // q_seq_shards) % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                          block_kv_dq=block)
    return sk.make_splash_mqa(sm.MultiHeadMask([one] * G), block_sizes=sizes, head_shards=1,
                              q_seq_shards=q_seq_shards, interpret=interpret)


def _splash_kernel_for(L, G, window, q_seq_shards, *, interpret):
    return _splash_kernel(L, G, window or None, interpret, q_seq_shards)


def _per_shard(fn, q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS):
    """Runs fn on each device's shard under the ambient mesh (jax.set_mesh): Mosaic kernels
    cannot be partitioned automatically. Rows split over the batch axes; heads over the head
    axis only when it divides K, so each shard keeps whole GQA groups."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return fn(q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS)
    rows = logical_to_spec(("act_batch",), q_BLHD.shape[:1], mesh)[0]
    heads = logical_to_spec(("act_kv_heads",), k_BSKD.shape[2:3], mesh)[0]
    qkv, seg = P(rows, None, heads, None), P(rows, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS)


def splash(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None, interpret=False):
    """The Pallas TPU splash-attention kernel, vmapped over rows and kv heads: [B, L, H, D].

    Training / prefill only: with a non-zero (or traced) q_offset, L != S, or L not a multiple of
    128 it runs `blockwise` (with block_q / block_k) instead. Its own block size is the largest
    of 512 / 256 / 128 dividing L. Under a mesh it runs per shard (`_per_shard`). interpret=True
    runs the kernel in Pallas interpret mode (CPU tests); otherwise it needs a TPU.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    cp = context_parallel.sequence_shards()
    if not (_static_zero(mask.q_offset) and L == S and L % (128 * cp) == 0):
        return _maybe_split(blockwise, q_BLHD, k_BSKD, v_BSKD, mask, block_q=block_q, block_k=block_k)
    if context_parallel.applies(q_BLHD, k_BSKD, True):
        make = functools.partial(_splash_kernel_for, interpret=interpret)
        return context_parallel.splash_split(make, q_BLHD, k_BSKD, v_BSKD, mask.q_segment_ids_BL,
                                             mask.kv_segment_ids_BS, sliding_window=mask.sliding_window)
    kernel = _splash_kernel(L, H // K, mask.sliding_window or None, interpret)

    def run(q, k, v, q_seg, kv_seg):  # one shard: b rows, k kv heads
        b, _, h, _ = q.shape
        # Splash does not scale the logits; a row's kv heads share its segment ids.
        q_bKGLD = (q / math.sqrt(D)).reshape(b, L, k.shape[2], h // k.shape[2], D).transpose(0, 2, 3, 1, 4)
        k_bKSD, v_bKSD = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))
        per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
        segments = SegmentIds(q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
        out_bKGLD = jax.vmap(per_row)(q_bKGLD, k_bKSD, v_bKSD, segments)
        return out_bKGLD.transpose(0, 3, 1, 2, 4).reshape(b, L, h, D).astype(q.dtype)

    return _per_shard(run, q_BLHD, k_BSKD, v_BSKD, mask.q_segment_ids_BL, mask.kv_segment_ids_BS)


# --- the table and the one entry point -----------------------------------------------------------

BACKENDS = {
    "reference": reference,
    "blockwise": blockwise,
    # One function, two kernels: only the implementation string differs.
    "xla": functools.partial(_dot_product, implementation="xla"),
    "cudnn": functools.partial(_dot_product, implementation="cudnn"),
    "splash": splash,
}

_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}  # anything else: blockwise


def resolve(implementation: str, platform: str | None = None) -> str:
    """The backend name for `implementation` ("auto" or a key of BACKENDS) on `platform`
    (default: jax.default_backend()). "auto": splash on TPU, cudnn on GPU, blockwise elsewhere."""
    if implementation == "auto":
        return _AUTO.get(platform or jax.default_backend(), "blockwise")
    if implementation not in BACKENDS:
        raise ConfigError(f"model.attention={implementation!r} is not an attention backend; "
                         f"use one of: auto, {', '.join(BACKENDS)}")
    return implementation


def attend(q_BLHD, k_BSKD, v_BSKD, *, q_segment_ids_BL, kv_segment_ids_BS, q_offset=0,
           sliding_window=None, implementation="auto", block_q=None, block_k=None) -> jax.Array:
    """Grouped-query attention under the module's mask rule: out [B, L, H, D] in q's dtype.

    q_BLHD [B, L, H, D]; k_BSKD / v_BSKD [B, S, K, D] with H a multiple of K (cast to q's dtype
    for the scores). q_segment_ids_BL [B, L] / kv_segment_ids_BS [B, S]: int, 0 = padding.
    q_offset: index of the first query among the keys (decode against a KV cache: the cache
    index; may be traced). sliding_window: None / 0 for none. implementation: "auto" or a key
    of BACKENDS (see `resolve`). block_q / block_k: blockwise tile sizes (also used when splash
    falls back to blockwise: for q_offset != 0, L != S or L % 128 != 0); None: `default_blocks()`.
    Under a mesh whose "sequence" axis is > 1 (context parallelism) a training call (no cache,
    L divisible by that axis) runs per sequence shard: `jaxft.models.context_parallel`.
    """
    H, K = q_BLHD.shape[2], k_BSKD.shape[2]
    if H % K or k_BSKD.shape != v_BSKD.shape or q_BLHD.shape[3] != k_BSKD.shape[3]:
        raise ValueError(f"attend: q {q_BLHD.shape} needs k == v [B, S, K, D] with H % K == 0; "
                         f"got k {k_BSKD.shape}, v {v_BSKD.shape}")
    name = resolve(implementation)
    mask = AttentionMask(q_segment_ids_BL, kv_segment_ids_BS, q_offset, sliding_window or None)
    if name == "splash":  # splits itself (its kernel's mask tables are split too)
        return splash(q_BLHD, k_BSKD, v_BSKD, mask, block_q=block_q, block_k=block_k)
    return _maybe_split(BACKENDS[name], q_BLHD, k_BSKD, v_BSKD, mask, block_q=block_q, block_k=block_k)


def _maybe_split(backend, q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, **blocks):
    """backend(...), or, with tokens split over the mesh's sequence axis (context parallelism),
    backend per shard: its queries against every key of the row."""
    if not context_parallel.applies(q_BLHD, k_BSKD, _static_zero(mask.q_offset)):
        return backend(q_BLHD, k_BSKD, v_BSKD, mask, **blocks)

    def attend_shard(q, k, v, q_seg, kv_seg, q_offset):
        return backend(q, k, v, AttentionMask(q_seg, kv_seg, q_offset, mask.sliding_window), **blocks)

    return context_parallel.attend_split(attend_shard, q_BLHD, k_BSKD, v_BSKD, mask.q_segment_ids_BL,
                                         mask.kv_segment_ids_BS)
