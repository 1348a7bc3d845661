"""Expert parallelism: an MoE layer's experts split over the "expert" mesh axis, each (token,
expert) pair sent to the device that holds its expert.

Under a mesh whose `expert` axis is n > 1 (`mesh.expert`), `LOGICAL_RULES` gives each device
along it X / n whole experts ("experts" -> expert) and makes the axis one more batch axis for
everything else (as MaxText does). `over_mesh(dropless_experts)` then runs the routed experts in
a `jax.shard_map` that is manual over the axes splitting the token rows (data, fsdp, expert,
sequence; tensor stays automatic, so the expert kernels' mlp axis is split by XLA as before):

1. Each device takes its own tokens' T * K (token, expert) pairs (routing happened outside, on
   every token: the router statistics are the one-device ones) and sorts them by expert, hence
   by destination device (expert // (X / n)).
2. One all-to-all over `expert` sends each destination its pairs: the token's hidden state,
   its local expert id and routing weight, in a block of C = T * min(K, X / n) rows.
3. Each device runs its X / n experts on the n * C rows it received, by the same dropless
   grouped matmuls as one device (`dropless_experts` with k = 1; padding rows carry expert id
   X / n, which no group holds, and weight 0).
4. The reverse all-to-all returns each pair's weighted output to its token's device, which adds
   the pairs of each token.

Dropless with static shapes: a device may send all its pairs to one destination, and no token
picks one expert twice, so C = T * min(K, X / n) holds the worst case; nothing is dropped and
no capacity factor exists. The price is the padding: each all-to-all moves n * C rows a
device, and the received buffer (and the grouped matmul over it) holds n * C rows: n times one
device's T * K pairs when K <= X / n. `jax.lax.ragged_all_to_all` would move only the real
pairs, but XLA:CPU does not implement it ("HLO opcode `ragged-all-to-all` is not supported by
XLA:CPU"), so it could not be tested here: one path, the dense all-to-all, runs everywhere.

Gradients flow through the all-to-alls (their transpose is the reverse all-to-all), the
gathers and the grouped matmuls; the expert kernels enter the region replicated over the
non-expert token axes, so their gradients are summed over those axes at the boundary (FSDP's
reduce-scatter).

Axis letters as in `jaxft.models.moe`: T tokens, E embed, X experts, K experts per token,
F expert hidden; R rows received (n * C).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxft.parallel.sharding import axis_size, current_mesh, mesh_axes

AXIS = "expert"
# The mesh axes that split an MoE layer's flattened [B * L] token rows, major to minor: the
# batch axes (act_batch) then sequence (act_length), as x.reshape(-1, E) lays them out.
TOKEN_AXES = mesh_axes("act_batch") + mesh_axes("act_length")


def expert_shards() -> int:
    """Size of the ambient mesh's expert axis (1 without a mesh or without the axis)."""
    mesh = current_mesh()
    return 1 if mesh is None else axis_size(mesh, AXIS)


def over_mesh(local_experts):
    """`local_experts` (`jaxft.models.moe.dropless_experts`'s signature) as it runs under the
    ambient mesh: itself without an expert axis > 1, else its expert-parallel version."""
    if expert_shards() == 1:
        return local_experts
    return functools.partial(dispatch, local_experts)


def dispatch(local_experts, x_TE, weights_TK, experts_TK, gate_XEF, up_XEF, down_XFE, activation: str,
             matmul: str | None = None, *, biases=None, adapt=None, **glu):
    """sum over k of weights[t, k] * expert[experts[t, k]](x[t]) with the experts split over the
    ambient mesh's expert axis (the module docstring): [T, E] like x_TE. biases (gpt-oss's
    per-expert gate / up / down biases) and adapt (LoRA on the routed experts,
    `jaxft.models.lora.ExpertAdapters`: per-expert A and B) split with their experts; glu: the
    activation's scalars; matmul: the grouped matmuls' layout, as `dropless_experts`."""
    mesh = current_mesh()
    n, X = axis_size(mesh, AXIS), gate_XEF.shape[0]
    if X % n:
        raise ValueError(f"the mesh's expert axis ({n}) does not divide the {X} experts (mesh.expert)")
    token_axes = tuple(a for a in TOKEN_AXES if axis_size(mesh, a) > 1)
    T = x_TE.shape[0]
    pad = -T % math.prod(axis_size(mesh, a) for a in token_axes)
    if pad:  # e.g. one decoding token: padded rows route to expert 0 with weight 0
        x_TE, weights_TK, experts_TK = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x_TE, weights_TK, experts_TK))
    rows, experts = P(token_axes), P(AXIS)
    adapters = None if adapt is None else (adapt.pairs, adapt.rng)  # A, B split by expert; the key whole
    adapt = None if adapt is None else dataclasses.replace(adapt, pairs=None, rng=None)  # arrays: via `adapters`
    local = functools.partial(_local, local_experts, activation=activation, matmul=matmul, glu=glu, adapt=adapt)
    adapter_specs = P() if adapt is None else (experts, P())
    in_specs = (rows, rows, rows, experts, experts, experts, experts, adapter_specs)
    y_TE = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                         out_specs=rows, axis_names=set(token_axes), check_vma=False)(
        x_TE, weights_TK, experts_TK, gate_XEF, up_XEF, down_XFE, biases, adapters)
    return y_TE[:T] if pad else y_TE


def _local(local_experts, x_TE, weights_TK, experts_TK, gate_XEF, up_XEF, down_XFE, biases, adapters, *,
           activation, matmul, glu, adapt):
    """One device: its tokens' pairs out to the experts' devices, its experts on the pairs it
    receives, the outputs back and summed per token. X here is this device's experts (X / n)."""
    n = lax.axis_size(AXIS)
    T, K = experts_TK.shape
    X = gate_XEF.shape[0]
    C = T * min(K, X)  # the most pairs one device can send another
    flat = experts_TK.reshape(-1)  # global expert ids
    order = jnp.argsort(flat, stable=True)  # pairs by expert, hence by destination
    counts = jnp.bincount(flat // X, length=n).astype(jnp.int32)  # pairs to each destination
    starts = jnp.cumsum(counts) - counts
    # Send slot (d, s) of the [n * C] buffer carries sorted pair starts[d] + s, if s < counts[d].
    slot = jnp.arange(n * C, dtype=jnp.int32)
    dest, s = slot // C, slot % C
    valid = s < counts[dest]
    pair = order[jnp.minimum(starts[dest] + s, T * K - 1)]
    token = pair // K
    send_x = jnp.where(valid[:, None], jnp.take(x_TE, token, axis=0), 0)
    send_e = jnp.where(valid, flat[pair] % X, X)  # X: no group (padding)
    send_w = jnp.where(valid, weights_TK.reshape(-1)[pair], 0)

    def exchange(a):  # block d of C rows to device d; received blocks in source order
        return lax.all_to_all(a, AXIS, 0, 0, tiled=True)

    x_RE, e_R, w_R = exchange(send_x), exchange(send_e), exchange(send_w)
    if adapt is not None:  # this device's experts' adapters
        adapt = dataclasses.replace(adapt, pairs=adapters[0], rng=adapters[1])
    y_RE = local_experts(x_RE, w_R[:, None], e_R[:, None], gate_XEF, up_XEF, down_XFE, activation, matmul, biases=biases,
                         adapt=adapt, **glu)
    back = exchange(y_RE)  # each pair's weighted output, in this device's send slots
    return jnp.zeros_like(x_TE).at[token].add(jnp.where(valid[:, None], back, 0))
