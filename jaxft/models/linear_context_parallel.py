"""Context parallelism for Gated DeltaNet layers: each sequence shard runs the conv and the
chunked rule on its own tokens, and the recurrent state is handed from shard to shard.

Under a mesh whose "sequence" axis splits a row's tokens into cp contiguous parts
(`jaxft.models.context_parallel`), a linear layer's conv and rule carry state along the row. Per
shard (`jax.shard_map`):
  1. the conv reads its W - 1 previous inputs (and their segment ids) from the shard before it
     (`lax.ppermute`; the first shard reads padding), under the same segment rule as a whole row;
  2. the rule is affine in its initial state: over a shard's tokens S_end = A S_in + F, and each
     output o_t = o0_t + S_in^T (A_t^T q_t), where F and o0 are the shard's run from a zero state.
     One local run at value width V + K, with values [v | 0] and initial state [0 | I], yields
     F and A as its final state and o0_t and A_t^T q_t as its outputs;
  3. the shards all-gather their (A, F) and whether their first segment continues the row's
     last segment before them; each folds the maps of the shards before it into its incoming
     state S_in (dropped where its first segment is a new one) and adds S_in's contribution to
     its outputs.
Per device the rule's work is 2 / cp of the row's (twice its own tokens' at width 2V), against
the whole row's on every shard when the row is gathered instead; the exchange is cp x (K K + K V)
floats a row and value head. Gradients flow through the collectives (all-gather's transpose is
a reduce-scatter, ppermute's the reverse ppermute).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxft.models import gated_deltanet
from jaxft.models.context_parallel import AXIS, sequence_shards
from jaxft.parallel.sharding import current_mesh, logical_to_spec


def applies(length: int) -> bool:
    """Whether a linear layer's row of `length` tokens is split over the mesh's sequence axis
    (evenly: a shard_map needs equal parts)."""
    cp = sequence_shards()
    return cp > 1 and length % cp == 0


def _first_and_last_ids(seg_BL):
    """Each row's first and last nonzero segment id ([B] int32; 0 for a row of padding)."""
    nonzero = seg_BL != 0
    first = jnp.argmax(nonzero, axis=1)  # 0 for a row of padding, whose id there is 0 anyway
    last = seg_BL.shape[1] - 1 - jnp.argmax(nonzero[:, ::-1], axis=1)
    return (jnp.take_along_axis(seg_BL, i[:, None], 1)[:, 0] for i in (first, last))


def conv_and_rule(qkv_BLC, conv_WC, g_BLH, beta_BLH, segment_ids_BL, *, key_heads: int, key_dim: int,
                  value_dim: int, chunk_size: int, recompute: bool = False):
    """The linear layer's conv (SiLU) and gated delta rule over rows split along the sequence axis
    of the ambient mesh. qkv_BLC [B, L, C] (the in_proj_qkv output, padding zeroed), conv_WC
    [W, C], g / beta [B, L, H] float32, segment_ids [B, L]. Returns out [B, L, H, V] in qkv's
    dtype, split like qkv: equal to `causal_conv1d` and `gated_delta_rule` over whole rows.
    recompute: the shard's work under its own `jax.checkpoint` (layers rematerialised): its backward
    runs the conv and the rule again instead of keeping their intermediates at width V + K, which
    the layer's remat alone did not drop on TPU (Qwen3.5-0.8B, 4 x 4,096 tokens on v5p-8 with
    sequence 2: 5.64 -> 4.59 GiB a chip, `jaxft plan`)."""
    mesh = current_mesh()
    cp = mesh.shape[AXIS]
    rows = logical_to_spec(("act_batch",), qkv_BLC.shape[:1], mesh)[0]
    W = conv_WC.shape[0]
    Hk, Dk, Dv = key_heads, key_dim, value_dim
    forward = [(j, j + 1) for j in range(cp - 1)]

    def local(qkv, conv_w, g, beta, seg):
        b, length, _ = qkv.shape
        Hv = g.shape[-1]
        halo, halo_seg = (lax.ppermute(x[:, length - (W - 1):], AXIS, forward) for x in (qkv, seg))
        x, _ = gated_deltanet.causal_conv1d(jnp.concatenate([halo, qkv], 1), conv_w,
                                            segment_ids=jnp.concatenate([halo_seg, seg], 1), activation="silu")
        q, k, v = jnp.split(x[:, W - 1:], [Hk * Dk, 2 * Hk * Dk], axis=-1)
        q, k, v = q.reshape(b, length, Hk, Dk), k.reshape(b, length, Hk, Dk), v.reshape(b, length, Hv, Dv)
        # One run from the basis: values [v | 0], state [0 | I] -> outputs [o0 | A_t^T q], final [F | A]
        # (the rule computes in float32; its outputs come back in the activations' dtype).
        values = jnp.concatenate([v, jnp.zeros((b, length, Hv, Dk), v.dtype)], -1)
        basis = jnp.concatenate([jnp.zeros((b, Hv, Dk, Dv), jnp.float32),
                                 jnp.broadcast_to(jnp.eye(Dk, dtype=jnp.float32), (b, Hv, Dk, Dk))], -1)
        out, final = gated_deltanet.gated_delta_rule(q, k, values, g, beta, segment_ids=seg, initial_state=basis,
                                                     chunk_size=chunk_size)
        first, last = _first_and_last_ids(seg)
        maps, offsets, firsts, lasts = (lax.all_gather(t, AXIS) for t in (final[..., Dv:], final[..., :Dv], first, last))
        state = jnp.zeros((b, Hv, Dk, Dv), jnp.float32)
        before = jnp.zeros((b,), jnp.int32)  # the last nonzero segment id before shard j
        incoming = []
        for j in range(cp):
            new_segment = (firsts[j] != 0) & (firsts[j] != before)
            state = jnp.where(new_segment[:, None, None, None], 0.0, state)
            incoming.append(state)
            state = jnp.einsum("bhkK,bhKv->bhkv", maps[j], state) + offsets[j]
            before = jnp.where(lasts[j] != 0, lasts[j], before)
        s_in = jnp.stack(incoming)[lax.axis_index(AXIS)]
        correction = jnp.einsum("blhk,bhkv->blhv", out[..., Dv:], s_in, preferred_element_type=jnp.float32)
        return (out[..., :Dv] + correction).astype(qkv.dtype)

    body = jax.checkpoint(local) if recompute else local
    return jax.shard_map(body, mesh=mesh, in_specs=(P(rows, AXIS, None), P(), P(rows, AXIS, None),
                                                    P(rows, AXIS, None), P(rows, AXIS)),
                         out_specs=P(rows, AXIS, None, None), check_vma=False)(
        qkv_BLC, conv_WC, g_BLH, beta_BLH, segment_ids_BL)
