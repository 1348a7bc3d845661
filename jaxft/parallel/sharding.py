"""Device mesh, the logical-axis rules table, and the shardings derived from it.

Model code names axes logically ("embed", "mlp", "act_batch", ...); this file alone maps those
names to the mesh axes ("data", "fsdp", "sequence", "tensor"). Parameters are sharded over
fsdp and sequence (their embed dimension: context-parallel devices hold parameter shards too,
as fsdp ones do) and tensor (heads / mlp / vocab); activations over data+fsdp (batch), sequence
(the token axis: context parallelism, see `jaxft.models.context_parallel`) and tensor. A
dimension that a mesh axis does not divide is replicated along that axis instead.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axis (or axes) it is split over; None = replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # the stacked-layer axis of scanned models
    "vocab": "tensor",
    "embed": ("fsdp", "sequence"),
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "per_layer": None,
    "experts": None,  # MoE experts' stacked axis (sharded within each expert by its other axes)  # Gemma 4's per-layer input width (small): replicated
    "lora_rank": None,  # LoRA adapters' rank axis: small, replicated
    "q_lora": None,  # multi-head latent attention's query / latent ranks (DeepSeek): small, replicated
    "kv_lora": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": "sequence",
    # [B * L] token rows: dense layers contract them as one axis when "act_length" is not split
    "act_tokens": ("data", "fsdp"),
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, sequence: int = 1) -> Mesh:
    """A ("data", "fsdp", "sequence", "tensor") mesh over all devices; one size may be -1 (= the
    rest). Device order puts tensor, then sequence, innermost: neighbouring devices (one host's)
    share the axes that talk every layer."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "sequence": sequence, "tensor": tensor}
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
            f"mesh.data * mesh.fsdp * mesh.sequence * mesh.tensor = {math.prod(sizes.values())} but there are "
            f"{len(devices)} devices; set one of them to -1 to use the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config) -> Mesh:
    """The mesh of the `mesh.*` config keys."""
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, sequence=config.mesh.sequence)


def check_batch_divisibility(config, mesh: Mesh, *, rows_per_example: int = 1) -> None:
    """Batch sizes must split evenly over hosts, micro-batches and the batch mesh axes
    (`rows_per_example`: device rows one example occupies, 2 for an unpacked DPO pair)."""
    batch = config.train.batch_size
    accumulate = config.optim.accumulate
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_rows = batch // accumulate * rows_per_example
    if jax.process_count() > 1 and batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the number of hosts ({jax.process_count()})"
        )
    if micro_rows % shards:
        raise ConfigError(
            f"train.batch_size / optim.accumulate = {batch // accumulate} is not divisible by "
            f"mesh.data * mesh.fsdp = {shards}; choose a batch size that is a multiple of {shards}"
            f" per micro-batch"
        )
    sequence = mesh.shape["sequence"]
    if sequence > 1 and config.data.max_length % sequence:
        raise ConfigError(
            f"data.max_length={config.data.max_length} is not divisible by mesh.sequence={sequence}: "
            f"context parallelism splits every row into mesh.sequence equal parts"
        )


def _mesh_axes(name: str | None) -> tuple[str, ...]:
    """The mesh axes LOGICAL_RULES splits logical axis `name` over (none for None)."""
    target = LOGICAL_RULES.get(name) if name else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec for logical `axes`; drops mesh axes that do not divide `shape`."""
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no entry in jaxft.parallel.sharding.LOGICAL_RULES")
        mesh_axes = _mesh_axes(name)
        kept = []
        for m in mesh_axes:
            size = mesh.shape[m] if mesh is not None else 1
            dim = shape[i] if shape is not None else None
            divides = dim is None or dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0
            if m not in used and size > 1 and divides:
                kept.append(m)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (tuple(kept) if kept else None))
    return P(*spec)


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def splits(logical_axis: str) -> bool:
    """Whether the ambient mesh splits `logical_axis` over more than one device."""
    mesh = _current_mesh()
    return mesh is not None and any(mesh.shape[m] > 1 for m in _mesh_axes(logical_axis))


def token_groups(rows: int, length: int) -> tuple[int, int]:
    """(row blocks, position blocks) a [rows, length] activation is split into over the ambient
    mesh's devices (act_batch, act_length), each 1 where the mesh does not split it evenly: the
    `groups` of `jaxft.losses.chunked_token_logps`, so each device works on its own tokens."""
    mesh = _current_mesh()
    if mesh is None:
        return 1, 1

    def blocks(logical_axis: str, size: int) -> int:
        n = 1
        for m in _mesh_axes(logical_axis):
            n *= mesh.shape[m]
        return n if size % n == 0 else 1

    return blocks("act_batch", rows), blocks("act_length", length)


def vocab_parallel_axes(rows: int, length: int, lm_head_shape: Sequence[int]):
    """(row axes, position axes, embed axes, vocab axes) for `jaxft.losses.chunked_token_logps(
    vocab_parallel=)` under the ambient mesh, each a tuple of mesh axis names: how a [rows,
    length] activation and the [E, V] lm_head (as `param_shardings` lays it out) are split.
    None, for the loss's plain path, without a mesh, when lm_head is not split (data
    parallelism alone), or when its mesh axes together do not divide the vocabulary."""
    mesh = _current_mesh()
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
    mesh = _current_mesh()
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
    """A [B, L] batch field: rows split over data and fsdp, tokens over sequence."""
    return NamedSharding(mesh, P(("data", "fsdp"), "sequence"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
