"""Activation rematerialisation policies by name (`model.remat`), as MaxText names them.

What a layer keeps for the backward pass, from most memory to least:
  none           everything (no recomputation)
  dots_no_batch  the matmul outputs without a batch dimension (weights-side products); the
                 rest recomputed
  dots           every matmul output; elementwise work recomputed
  offload        like dots_no_batch, but those outputs wait in host memory (accelerators
                 with pinned host memory; not the CPU)
  full           only the layer's input: the whole layer is recomputed
"""

from __future__ import annotations

import jax

from jaxft.errors import ConfigError

_POLICIES = jax.checkpoint_policies

REMAT_POLICIES = {
    "none": None,
    "full": _POLICIES.nothing_saveable,
    "dots": _POLICIES.checkpoint_dots,
    "dots_no_batch": _POLICIES.dots_with_no_batch_dims_saveable,
    "offload": _POLICIES.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def normalize_remat(value) -> str:
    """A policy name; True / False (older configs) mean "full" / "none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={value!r} is not a remat policy; choose one of {', '.join(REMAT_POLICIES)}")
    return value


def remat(fn, name: str):
    """`fn` under `jax.checkpoint` with the policy `name` ("none": `fn` itself)."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name])
