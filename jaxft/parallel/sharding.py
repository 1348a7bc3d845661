"""Device mesh, the logical-axis rules table, and the shardings derived from it.

Model code names axes logically ("embed", "mlp", "act_batch", ...); this file alone maps those
names to the mesh axes ("data", "fsdp", "expert", "sequence", "tensor"). Parameters are
sharded over fsdp, sequence and expert (their embed dimension: context- and expert-parallel
devices hold parameter shards too, as fsdp ones do) and tensor (heads / mlp / vocab); MoE
experts' stacked axis over expert (`jaxft.models.expert_parallel`); activations over
data+fsdp+expert (batch), sequence (the token axis: context parallelism, see
`jaxft.models.context_parallel`) and tensor. A dimension that a mesh axis does not divide is
replicated along that axis instead.

A mesh holds the "expert" axis only when it is > 1: without it every program is the one it
was before the axis existed (an axis of size 1 would still be named in the lowered program).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
# Axes that split a batch's rows (act_batch): the expert axis is one more data axis outside MoE experts.
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or axes) it is split over; None = replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # the stacked-layer axis of scanned models
    "vocab": "tensor",
    "embed": ("fsdp", "sequence", "expert"),
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "per_layer": None,  # Gemma 4's per-layer input width (small): replicated
    "experts": "expert",  # MoE experts' stacked axis: each expert-parallel device its own experts
    "lora_rank": None,  # LoRA adapters' rank axis: small, replicated
    "q_lora": None,  # multi-head latent attention's query / latent ranks (DeepSeek): small, replicated
    "kv_lora": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_length": "sequence",
    # [B * L] token rows: dense layers contract them as one axis when "act_length" is not split
    "act_tokens": BATCH_AXES,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, sequence: int = 1,
              expert: int = 1) -> Mesh:
    """A ("data", "fsdp", "expert", "sequence", "tensor") mesh over all devices; one size may be
    -1 (= the rest); "expert" only when > 1 (see the module docstring). Device order puts
    tensor, then sequence, then expert innermost: neighbouring devices (one host's) share the
    axes that talk every layer."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "sequence": sequence, "tensor": tensor}
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ConfigError(f"only one of mesh.{', mesh.'.join(unknown)} may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    if unknown:
        if len(devices) % known:
            raise ConfigError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axis sizes "
                f"{ {k: v for k, v in sizes.items() if v != -1} }"
            )
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(
            f"mesh.data * mesh.fsdp * mesh.expert * mesh.sequence * mesh.tensor = {math.prod(sizes.values())} but "
            f"there are {len(devices)} devices; set one of them to -1 to use the rest"
        )
    names = tuple(a for a in MESH_AXES if a != "expert" or sizes[a] > 1)
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in names))
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def mesh_from_config(config) -> Mesh:
    """The mesh of the `mesh.*` config keys."""
    m = config.mesh
    return make_mesh(m.data, m.fsdp, m.tensor, sequence=m.sequence, expert=m.expert)


def axis_size(mesh, name: str) -> int:
    """Devices along mesh axis `name` (1 when the mesh has no such axis: "expert" of size 1)."""
    return dict(mesh.shape).get(name, 1)


def check_batch_divisibility(config, mesh: Mesh, *, rows_per_example: int = 1) -> None:
    """Batch sizes must split evenly over hosts, micro-batches and the batch mesh axes
    (`rows_per_example`: device rows one example occupies, 2 for an unpacked DPO pair)."""
    batch = config.train.batch_size
    accumulate = config.optim.accumulate
    shards = math.prod(axis_size(mesh, a) for a in BATCH_AXES)
    micro_rows = batch // accumulate * rows_per_example
    if jax.process_count() > 1 and batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the number of hosts ({jax.process_count()})"
        )
    if micro_rows % shards:
        raise ConfigError(
            f"train.batch_size / optim.accumulate = {batch // accumulate} is not divisible by "
            f"mesh.data * mesh.fsdp * mesh.expert = {shards}; choose a batch size that is a multiple of {shards}"
            f" per micro-batch"
        )
    sequence = mesh.shape["sequence"]
    if sequence > 1 and config.data.max_length % sequence:
        raise ConfigError(
            f"data.max_length={config.data.max_length} is not divisible by mesh.sequence={sequence}: "
            f"context parallelism splits every row into mesh.sequence equal parts"
        )


def check_expert_divisibility(num_experts: int, mesh: Mesh) -> None:
    """An MoE model's experts must split evenly over mesh.expert (each device its own experts)."""
    n = axis_size(mesh, "expert")
    if n > 1 and num_experts and num_experts % n:
        raise ConfigError(
            f"mesh.expert={n} does not divide the model's {num_experts} experts: expert parallelism gives every "
            f"device along mesh.expert the same number of whole experts; choose a divisor of {num_experts}"
        )


def mesh_axes(name: str | None) -> tuple[str, ...]:
    """The mesh axes LOGICAL_RULES splits logical axis `name` over (none for None)."""
    target = LOGICAL_RULES.get(name) if name else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec for logical `axes`; drops mesh axes that do not divide `shape`."""
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no entry in jaxft.parallel.sharding.LOGICAL_RULES")
        axes = mesh_axes(name)
        kept = []
        for m in axes:
            size = axis_size(mesh, m) if mesh is not None else 1
            dim = shape[i] if shape is not None else None
            divides = dim is None or dim % (size * math.prod(axis_size(mesh, k) for k in kept)) == 0
            if m not in used and size > 1 and divides:
                kept.append(m)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (tuple(kept) if kept else None))
    return P(*spec)


def current_mesh():
    """The ambient (abstract) mesh of `jax.set_mesh`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def splits(logical_axis: str) -> bool:
    """Whether the ambient mesh splits `logical_axis` over more than one device."""
    mesh = current_mesh()
    return mesh is not None and any(axis_size(mesh, m) > 1 for m in mesh_axes(logical_axis))


def token_groups(rows: int, length: int) -> tuple[int, int]:
    """(row blocks, position blocks) a [rows, length] activation is split into over the ambient
    mesh's devices (act_batch, act_length), each 1 where the mesh does not split it evenly: the
    `groups` of `jaxft.losses.chunked_token_logps`, so each device works on its own tokens."""
    mesh = current_mesh()
    if mesh is None:
        return 1, 1

    def blocks(logical_axis: str, size: int) -> int:
        n = 1
        for m in mesh_axes(logical_axis):
            n *= axis_size(mesh, m)
        return n if size % n == 0 else 1

    return blocks("act_batch", rows), blocks("act_length", length)


def vocab_parallel_axes(rows: int, length: int, lm_head_shape: Sequence[int]):
    """(row axes, position axes, embed axes, vocab axes) for `jaxft.losses.chunked_token_logps(
    vocab_parallel=)` under the ambient mesh, each a tuple of mesh axis names: how a [rows,
    length] activation and the [E, V] lm_head (as `param_shardings` lays it out) are split.
    None, for the loss's plain path, without a mesh, when lm_head is not split (data
    parallelism alone), or when its mesh axes together do not divide the vocabulary."""
    mesh = current_mesh()
    if mesh is None:
        return None
    specs = (logical_to_spec(("act_batch", "act_length"), (rows, length), mesh)
             + logical_to_spec(("embed", "vocab"), tuple(lm_head_shape), mesh))
    names = tuple(() if s is None else (s,) if isinstance(s, str) else tuple(s) for s in specs)
    split = names[2] + names[3]
    if not split or lm_head_shape[1] % math.prod(mesh.shape[m] for m in split):
        return None
    return names


def constrain(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """with_sharding_constraint by logical names under the ambient mesh; no-op without one."""
    mesh = current_mesh()
    if mesh is None or all(s == 1 for s in mesh.shape.values()):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def param_shardings(abstract_state, mesh: Mesh):
    """NamedSharding for every leaf of an `nnx.State` of Params with `logical_axes` metadata."""
    from flax import nnx

    def one(variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, variable.get_value().shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A [B, L] batch field: rows split over data, fsdp and expert, tokens over sequence."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape), "sequence"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
