"""A LoRA model as functions of (adapters, base): fresh adapters, the split the train step
uses, and merging adapters into the base's kernels (export, parity checks).

Both halves are plain nested dicts with the model's state paths: the base holds exactly the
paths of the same architecture without LoRA (an HF checkpoint's), the adapters only
`{name}_lora_a` / `{name}_lora_b` leaves. `nnx.merge(graphdef, adapters, base)` is the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.config import ModelConfig
from jaxft.models.hf import abstract_model
from jaxft.models.decoder import Decoder
from jaxft.models.lora import LoRAParam, projection_dims
from jaxft.models.paths import get_path
from jaxft.parallel.sharding import param_shardings


def lora_graphdef(cfg: ModelConfig):
    """(graphdef, abstract adapters, abstract base) of the LoRA model `cfg` (no memory)."""
    return nnx.split(abstract_model(cfg), LoRAParam, nnx.Param)


def adapter_shardings(cfg: ModelConfig, mesh) -> dict:
    _, abstract, _ = lora_graphdef(cfg)
    return nnx.to_pure_dict(param_shardings(abstract, mesh))


def init_adapters(cfg: ModelConfig, *, seed: int, mesh) -> tuple[object, dict]:
    """(graphdef, fresh adapters): A drawn from `seed`, B zero, created already sharded.
    The base's init inside the jitted function is dead code and never computed."""
    graphdef, _, _ = lora_graphdef(cfg)
    shardings = adapter_shardings(cfg, mesh)

    @jax.jit
    def init():
        state = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), LoRAParam))
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        return graphdef, init()


def adapters_off(adapters: dict) -> dict:
    """Adapters whose delta is exactly zero (B = 0): the model then computes its base."""
    return jax.tree.map(jnp.zeros_like, adapters)


def _adapted(tree: dict, prefix=()):
    """(path of the projection's module, projection name, A, B) for every adapter pair."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _adapted(value, prefix + (key,))
        elif key.endswith("_lora_a"):
            name = key[: -len("_lora_a")]
            yield prefix, name, value, tree[f"{name}_lora_b"]


def projection_delta(cfg: ModelConfig, name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """scale * A B in the kernel's layout ([lead..., in dims..., out dims...]). A is [lead...,
    in dims..., r], B [lead..., r, out dims...], lead the stacked layers and / or a routed
    expert's axis: the layer's own shape (Gemma 4's layers differ) is read from them;
    `projection_dims` gives how many dims are in."""
    in_shape, _, _, _ = projection_dims(cfg, name)
    lead = a.shape[:a.ndim - len(in_shape) - 1]
    r = cfg.lora.rank
    in_dims, out_dims = a.shape[len(lead):len(lead) + len(in_shape)], b.shape[len(lead) + 1:]
    a2 = a.astype(jnp.float32).reshape(lead + (-1, r))
    b2 = b.astype(jnp.float32).reshape(lead + (r, -1))
    return (cfg.lora.scale * (a2 @ b2)).reshape(lead + in_dims + out_dims)  # a2 @ b2: batched over lead


def merge_adapters(cfg: ModelConfig, base: dict, adapters: dict) -> dict:
    """The base params with every adapter folded into its kernel: W + scale * A B (computed
    in float32, stored in the base's dtype). Same paths as `base`; a plain model."""
    merged = jax.tree.map(lambda x: x, base)  # a new tree over the same (untouched) leaves
    for path, name, a, b in _adapted(adapters):
        node = get_path(merged, path)
        kernel = node[name]
        delta = projection_delta(cfg, name, a, b)
        node[name] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return merged


__all__ = ["adapter_shardings", "adapters_off", "init_adapters", "lora_graphdef", "merge_adapters",
           "projection_delta"]
