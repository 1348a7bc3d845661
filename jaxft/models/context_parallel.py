"""Context parallelism: attention over rows whose tokens are split over the "sequence" mesh axis.

Under a mesh with `sequence` > 1 every activation's token axis is split into equal contiguous
parts, one per device along that axis (`LOGICAL_RULES["act_length"]`). Everything but attention
is per token, so XLA partitions it as it is; attention needs every key. `attend` runs the
backend per shard (`jax.shard_map`): each device all-gathers the keys, values and key segment
ids of its row along the sequence axis and attends its own queries, placed at their index in
the row (q_offset = shard index x local length), under the same mask rule as everywhere else
(`jaxft.models.attention`): causal by index, packed segments, sliding window. The backward
pass reduce-scatters the key / value gradients back (the transpose of the all-gather).

This is all-gather context parallelism (as Llama 3's training and MaxText's): per device it
holds the whole row's keys and values, [B, S, K, D], but only its own queries, scores and
activations. Contiguous parts leave the causal work unbalanced (the last part sees every key,
the first only its own); the blockwise backend skips the key blocks a part cannot see, so the
first parts finish early rather than computing masked blocks.

Backends: splash builds its kernel for the whole row with `q_seq_shards` = the sequence size
and passes it into the shard_map sharded by query block (the kernel's own mask tables); the
others take the traced q_offset as they do for KV-cache decoding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.parallel.sharding import logical_to_spec

AXIS = "sequence"


def sequence_shards() -> int:
    """Size of the ambient mesh's sequence axis (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AXIS not in mesh.shape:
        return 1
    return mesh.shape[AXIS]


def applies(q_BLHD, k_BSKD, q_offset_is_zero: bool) -> bool:
    """Whether `attend` should split this call over the sequence axis: training / scoring
    (no KV cache: q_offset 0 and L == S) with L a multiple of the axis size."""
    cp = sequence_shards()
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    return cp > 1 and q_offset_is_zero and L == S and L % cp == 0


def _specs(q_BLHD, k_BSKD, mesh):
    rows = logical_to_spec(("act_batch",), q_BLHD.shape[:1], mesh)[0]
    heads = logical_to_spec(("act_kv_heads",), k_BSKD.shape[2:3], mesh)[0]
    return P(rows, AXIS, heads, None), P(rows, AXIS)


def _gather(x_BS):
    """This row's whole token axis (axis 1) from every shard along the sequence axis."""
    return lax.all_gather(x_BS, AXIS, axis=1, tiled=True)


def attend_split(attend_shard, q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS):
    """`attend_shard(q, k, v, q_seg, kv_seg, q_offset)` per sequence shard, with this shard's
    queries and the whole row's keys: [B, L, H, D] split like q."""
    mesh = jax.sharding.get_abstract_mesh()
    qkv, seg = _specs(q_BLHD, k_BSKD, mesh)

    def local(q, k, v, q_seg, kv_seg):
        offset = lax.axis_index(AXIS) * q.shape[1]
        return attend_shard(q, _gather(k), _gather(v), q_seg, _gather(kv_seg), offset)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS)


def splash_split(make_kernel, q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS, *, sliding_window):
    """The splash kernel per sequence shard. `make_kernel(L, G, window, q_seq_shards)` builds
    the GQA kernel for the whole row (with the caller's logit soft-cap, if any); its mask tables
    are split by query block like q."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    mesh = jax.sharding.get_abstract_mesh()
    cp = mesh.shape[AXIS]
    B, L, H, D = q_BLHD.shape
    K = k_BSKD.shape[2]
    kernel = make_kernel(L, H // K, sliding_window, cp)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(None, AXIS)))
    qkv, seg = _specs(q_BLHD, k_BSKD, mesh)

    def local(kernel, q, k, v, q_seg, kv_seg):  # b rows, l = L / cp queries, k kv heads
        b, length, h, _ = q.shape
        kk = k.shape[2]
        k, v, kv_seg = _gather(k), _gather(v), _gather(kv_seg)
        # Splash does not scale the logits; a row's kv heads share its segment ids.
        q_bKGlD = (q / math.sqrt(D)).reshape(b, length, kk, h // kk, D).transpose(0, 2, 3, 1, 4)
        k_bKSD, v_bKSD = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))
        per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
        segments = SegmentIds(q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
        out_bKGlD = jax.vmap(per_row, in_axes=(0, 0, 0, 0))(q_bKGlD, k_bKSD, v_bKSD, segments)
        return out_bKGlD.transpose(0, 3, 1, 2, 4).reshape(b, length, h, D).astype(q.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(kernel_spec, qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(kernel, q_BLHD, k_BSKD, v_BSKD, q_seg_BL, kv_seg_BS)
