"""Attention backends behind one function, `attend`, all with the mask of `llama.Attention`.

Axis letters as in decoder.py: B batch, L query length, S key length, H query heads, K key/value
heads, G query heads per kv head (H = K * G), D head dim. The blockwise kernel adds N / M query /
key blocks of T / C positions each (L padded to N * T, S to M * C).

The mask, the same for every backend: query l (at index q_offset + l) may attend to key s iff
  s <= q_offset + l                          causal by index within a row (segments are contiguous)
  q_offset + l - s < sliding_window          only when a window is set
  q_segment_ids[l] == kv_segment_ids[s] != 0 same packed segment, and never a padding key.
Scores are q.k / sqrt(D); with a logit soft-cap c (Gemma 2) they become c * tanh(scores / c)
before the mask and the softmax, in every backend (forward and gradient). Attention sinks
(gpt-oss: one learned logit per query head) join each row's softmax denominator and attend to
nothing: out = sum_s exp(x_s) v_s / (sum_s exp(x_s) + exp(sink)). reference and blockwise
compute them; xla runs reference for them, cudnn and splash run blockwise (never dropping them).
Softmax runs in float32. A query row with no allowed key (a padding query) gives finite output in
forward and gradient, but its value is the backend's own (reference / xla: the mean of v over all
keys; blockwise: 0; splash: attention over the padding keys): losses must mask those rows.

Backends (`BACKENDS[name]`, picked by `resolve`; "auto" = splash on TPU, cudnn on GPU, else
blockwise):
  reference  the einsum math the decoder had before the kernels; materialises [B, K, G, L, S] scores. The oracle.
  blockwise  pure-JAX flash attention: online softmax over key blocks, custom VJP recomputing per
             block, key blocks outside causality / the window skipped. Any platform, any length.
  xla/cudnn  `jax.nn.dot_product_attention` with a [B, 1, L, S] boolean mask (cudnn: GPU only,
             and cuDNN's own limits: bf16 / fp16 inputs, supported head dims). It has no soft-cap:
             with one, xla runs the reference math (it materialises the scores either way) and
             cudnn runs blockwise (keeping the O(L) memory a fused kernel promises).
  splash     the Pallas TPU splash kernel (q_offset == 0, L == S, L % 128 == 0; else blockwise),
             run per shard under the ambient mesh (`jax.set_mesh`): Mosaic cannot be auto-sharded.
             The soft-cap is the kernel's own `attn_logits_soft_cap`.
One query a row (L == 1: a decode step against a KV cache) runs `single_query` under every
backend but reference: batched dots over the KV cache's heads-major [B, K, S, D] layout (what the
decoder's cache holds; `attend` is given [B, S, K, D] and transposes back), no blocks, over the
cache's filled prefix only (a switch over a few compiled prefix lengths).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft.errors import ConfigError
from jaxft.models import context_parallel
from jaxft.models.attention_mask import MASKED, AttentionMask, allowed, static_zero
from jaxft.models.blockwise_attention import blockwise  # splash falls back to it by this name
from jaxft.parallel.sharding import logical_to_spec


# --- reference -------------------------------------------------------------------------------


def reference(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None,
              logit_softcap=None, sinks_H=None):
    """The original einsum attention, kept as the oracle: [B, L, H, D] in q's dtype. With
    logit_softcap c, the scaled scores become c * tanh(scores / c) before the mask (Gemma 2).
    sinks_H [H]: each head's sink logit, a column in the softmax that is dropped after it
    (gpt-oss, as transformers' eager attention)."""
    del block_q, block_k  # one signature for every backend
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_idx_L = mask.q_offset + jnp.arange(L)
    allowed_BLS = allowed(mask.q_segment_ids_BL, mask.kv_segment_ids_BS, q_idx_L, jnp.arange(S),
                          mask.sliding_window)
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, D)
    scores = jnp.einsum("BLKGD,BSKD->BKGLS", q_BLKGD, k_BSKD.astype(q_BLKGD.dtype))
    scores = scores.astype(jnp.float32) / math.sqrt(D)
    if logit_softcap:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    scores = jnp.where(allowed_BLS[:, None, None], scores, MASKED)
    if sinks_H is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    else:
        sink = jnp.broadcast_to(sinks_H.astype(jnp.float32).reshape(1, K, H // K, 1, 1), scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(v_BSKD.dtype)
    out_BLKGD = jnp.einsum("BKGLS,BSKD->BLKGD", probs, v_BSKD).astype(q_BLHD.dtype)
    return out_BLKGD.reshape(B, L, H, D)


# --- jax.nn.dot_product_attention (xla, cudnn) ---------------------------------------------------


def _dot_product(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, implementation, block_q=None,
                 block_k=None, logit_softcap=None):
    """`jax.nn.dot_product_attention` with the whole rule as a [B, 1, L, S] boolean mask.

    cudnn turns that mask into a [B, 1, L, S] bias (O(B L S) memory, but not per head) and runs
    its fused kernel; xla is the same call on any platform (it materialises the scores).
    That call has no logit soft-cap: with one, xla runs `reference` (the same materialised
    scores) and cudnn `blockwise` (with block_q / block_k), never dropping the cap.
    """
    if logit_softcap:
        if implementation == "xla":
            return reference(q_BLHD, k_BSKD, v_BSKD, mask, logit_softcap=logit_softcap)
        return blockwise(q_BLHD, k_BSKD, v_BSKD, mask, block_q=block_q, block_k=block_k,
                         logit_softcap=logit_softcap)
    del block_q, block_k
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    allowed_BLS = allowed(mask.q_segment_ids_BL, mask.kv_segment_ids_BS, mask.q_offset + jnp.arange(L),
                          jnp.arange(S), mask.sliding_window)
    # The mask already holds causality and the window; also stating them lets cuDNN skip the
    # masked-out tiles. Only when its top-left-aligned causal mask is ours: no offset, L == S.
    causal = static_zero(mask.q_offset) and L == S
    window = (mask.sliding_window - 1, 0) if causal and mask.sliding_window else None
    out = jax.nn.dot_product_attention(
        q_BLHD, k_BSKD.astype(q_BLHD.dtype), v_BSKD.astype(q_BLHD.dtype), mask=allowed_BLS[:, None],
        is_causal=causal, local_window_size=window, implementation=implementation,
    )
    return out.astype(q_BLHD.dtype)


# --- splash (Pallas TPU kernel) ------------------------------------------------------------------


def _splash_kernel(L: int, G: int, window: int | None, interpret: bool, q_seq_shards: int = 1,
                   softcap: float | None = None):
    """A GQA splash kernel for one (row, kv head): q [G, L, D], k / v [L, D] -> [G, L, D]
    (q_seq_shards > 1: its mask tables split by query block, for context parallelism; softcap:
    the kernel caps its (pre-scaled) logits as c * tanh(logits / c)).

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
                              q_seq_shards=q_seq_shards, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def _splash_kernel_for(L, G, window, q_seq_shards, *, interpret, softcap):
    return _splash_kernel(L, G, window or None, interpret, q_seq_shards, softcap)


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


def splash(q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, *, block_q=None, block_k=None,
           logit_softcap=None, interpret=False):
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
    if not (static_zero(mask.q_offset) and L == S and L % (128 * cp) == 0):
        return _maybe_split(blockwise, q_BLHD, k_BSKD, v_BSKD, mask, block_q=block_q, block_k=block_k,
                            logit_softcap=logit_softcap)
    softcap = logit_softcap or None
    if context_parallel.applies(q_BLHD, k_BSKD, True):
        make = functools.partial(_splash_kernel_for, interpret=interpret, softcap=softcap)
        return context_parallel.splash_split(make, q_BLHD, k_BSKD, v_BSKD, mask.q_segment_ids_BL,
                                             mask.kv_segment_ids_BS, sliding_window=mask.sliding_window)
    kernel = _splash_kernel(L, H // K, mask.sliding_window or None, interpret, softcap=softcap)

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


# --- one query row (a decode step) ------------------------------------------------------------


PREFIX_BLOCK = 64  # decode attention's smallest prefix step (slots); the tests lower it


def prefix_lengths(S: int, block: int | None = None) -> list[int]:
    """The key prefixes a decode step's attention is compiled for: multiples of `block` (None:
    PREFIX_BLOCK, or S / 8 rounded up to a multiple of it for long caches: at most 8 per layer),
    and S. smollm2_135m, 16 rows, 64 + 256 slots on CPU: 315 -> 347-368 tokens/s against the
    whole cache every step; steps of 32 (10 prefixes) were no faster and compiled 3 s longer."""
    block = block or max(PREFIX_BLOCK, -(-S // (8 * PREFIX_BLOCK)) * PREFIX_BLOCK)
    return sorted({min(S, n) for n in range(block, S + block, block)})


def single_query(q_BLHD, k_BKSD, v_BKSD, mask: AttentionMask, *, logit_softcap=None, sinks_H=None,
                 prefix_block=None):
    """One query per row (L == 1: a decode step against a KV cache) against keys and values laid
    out heads-major, [B, K, S, D] (the KV cache's layout): scores and output are batched dots over
    (B, K), with no transpose of the cache (in the [B, S, K, D] layout the same dots copy it
    transposed every layer and step on CPU, and sums of products over it read 30% slower).
    Only the cache's filled prefix is read: keys after the query's index (q_offset) are masked
    by causality, so the step attends to the first n keys for the smallest n of
    `prefix_lengths(S, prefix_block)` above q_offset (a `lax.switch` when q_offset is traced);
    a decode step then costs what the tokens so far cost, not what the whole cache would.
    The math of `reference` (f32 softmax, soft-cap, sinks); [B, 1, H, D] in q's dtype."""
    S = k_BKSD.shape[2]
    lengths = prefix_lengths(S, prefix_block)
    if len(lengths) == 1:
        return _single_query(q_BLHD, k_BKSD, v_BKSD, mask, logit_softcap=logit_softcap, sinks_H=sinks_H)

    def prefix(n):
        visible = AttentionMask(mask.q_segment_ids_BL, mask.kv_segment_ids_BS[:, :n], mask.q_offset,
                                mask.sliding_window)
        return _single_query(q_BLHD, k_BKSD[:, :, :n], v_BKSD[:, :, :n], visible, logit_softcap=logit_softcap,
                             sinks_H=sinks_H)

    if isinstance(mask.q_offset, numbers.Integral):
        return prefix(next((n for n in lengths if n > mask.q_offset), S))
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), mask.q_offset + 1), len(lengths) - 1)
    return jax.lax.switch(index, [functools.partial(prefix, n) for n in lengths])


def _single_query(q_BLHD, k_BKSD, v_BKSD, mask: AttentionMask, *, logit_softcap=None, sinks_H=None):
    """`single_query` over every key given."""
    B, L, H, D = q_BLHD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    q_BKGD = q_BLHD.reshape(B, K, H // K, D).astype(jnp.float32)
    ok_BS = allowed(mask.q_segment_ids_BL, mask.kv_segment_ids_BS, mask.q_offset + jnp.arange(L), jnp.arange(S),
                    mask.sliding_window)[:, 0]
    scores_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD.astype(jnp.float32)) / math.sqrt(D)
    if logit_softcap:
        scores_BKGS = logit_softcap * jnp.tanh(scores_BKGS / logit_softcap)
    scores_BKGS = jnp.where(ok_BS[:, None, None, :], scores_BKGS, MASKED)
    top_BKG = jnp.max(scores_BKGS, axis=-1)
    if sinks_H is not None:
        top_BKG = jnp.maximum(top_BKG, sinks_H.astype(jnp.float32).reshape(1, K, H // K))
    e_BKGS = jnp.exp(scores_BKGS - top_BKG[..., None])
    total_BKG = jnp.sum(e_BKGS, axis=-1)
    if sinks_H is not None:
        total_BKG = total_BKG + jnp.exp(sinks_H.astype(jnp.float32).reshape(1, K, H // K) - top_BKG)
    p_BKGS = (e_BKGS / total_BKG[..., None]).astype(v_BKSD.dtype)
    out_BKGD = jnp.einsum("bkgs,bksd->bkgd", p_BKGS, v_BKSD, preferred_element_type=jnp.float32)
    return out_BKGD.reshape(B, 1, H, D).astype(q_BLHD.dtype)


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
           sliding_window=None, logit_softcap=None, implementation="auto", block_q=None,
           block_k=None, sinks_H=None) -> jax.Array:
    """Grouped-query attention under the module's mask rule: out [B, L, H, D] in q's dtype.

    q_BLHD [B, L, H, D]; k_BSKD / v_BSKD [B, S, K, D] with H a multiple of K (cast to q's dtype
    for the scores). q_segment_ids_BL [B, L] / kv_segment_ids_BS [B, S]: int, 0 = padding.
    q_offset: index of the first query among the keys (decode against a KV cache: the cache
    index; may be traced). sliding_window: None / 0 for none. logit_softcap: None / 0 for none,
    or a positive Python float c (a model constant, e.g. Gemma 2's 50.0): the scaled scores
    become c * tanh(scores / c) before the mask, in every backend. implementation: "auto" or a key
    of BACKENDS (see `resolve`). block_q / block_k: blockwise tile sizes (also used when splash
    falls back to blockwise: for q_offset != 0, L != S or L % 128 != 0); None:
    `blockwise_attention.default_blocks()`. sinks_H: None, or [H] sink logits (gpt-oss), which
    reference and blockwise compute: xla then runs reference, cudnn and splash run blockwise.
    Under a mesh whose "sequence" axis is > 1 (context parallelism) a training call (no cache,
    L divisible by that axis) runs per sequence shard: `jaxft.models.context_parallel`.
    L == 1 runs `single_query` (any implementation but "reference").
    """
    H, K = q_BLHD.shape[2], k_BSKD.shape[2]
    if H % K or k_BSKD.shape != v_BSKD.shape or q_BLHD.shape[3] != k_BSKD.shape[3]:
        raise ValueError(f"attend: q {q_BLHD.shape} needs k == v [B, S, K, D] with H % K == 0; "
                         f"got k {k_BSKD.shape}, v {v_BSKD.shape}")
    if logit_softcap is not None and not (isinstance(logit_softcap, numbers.Real) and logit_softcap >= 0):
        raise ValueError(f"attend: logit_softcap must be None or a Python number >= 0 (0: none); "
                         f"got {logit_softcap!r}")
    name = resolve(implementation)
    mask = AttentionMask(q_segment_ids_BL, kv_segment_ids_BS, q_offset, sliding_window or None)
    opts = dict(block_q=block_q, block_k=block_k, logit_softcap=float(logit_softcap) if logit_softcap else None)
    if sinks_H is not None and sinks_H.shape != (H,):
        raise ValueError(f"attend: sinks_H must be [H] = [{H}]; got {sinks_H.shape}")
    if q_BLHD.shape[1] == 1 and name != "reference":  # a decode step: no blocks, no kernel
        return single_query(q_BLHD, jnp.swapaxes(k_BSKD, 1, 2), jnp.swapaxes(v_BSKD, 1, 2), mask,
                            logit_softcap=opts["logit_softcap"], sinks_H=sinks_H)
    if sinks_H is not None:  # only the reference math and blockwise have sinks
        name = "reference" if name in ("reference", "xla") else "blockwise"
        return _maybe_split(BACKENDS[name], q_BLHD, k_BSKD, v_BSKD, mask, **opts, sinks_H=sinks_H)
    if name == "splash":  # splits itself (its kernel's mask tables are split too)
        return splash(q_BLHD, k_BSKD, v_BSKD, mask, **opts)
    return _maybe_split(BACKENDS[name], q_BLHD, k_BSKD, v_BSKD, mask, **opts)


def _maybe_split(backend, q_BLHD, k_BSKD, v_BSKD, mask: AttentionMask, **opts):
    """backend(...), or, with tokens split over the mesh's sequence axis (context parallelism),
    backend per shard: its queries against every key of the row. opts: block_q, block_k,
    logit_softcap, passed to every shard's call."""
    if not context_parallel.applies(q_BLHD, k_BSKD, static_zero(mask.q_offset)):
        return backend(q_BLHD, k_BSKD, v_BSKD, mask, **opts)

    def attend_shard(q, k, v, q_seg, kv_seg, q_offset):
        return backend(q, k, v, AttentionMask(q_seg, kv_seg, q_offset, mask.sliding_window), **opts)

    return context_parallel.attend_split(attend_shard, q_BLHD, k_BSKD, v_BSKD, mask.q_segment_ids_BL,
                                         mask.kv_segment_ids_BS)
