"""A scanned model's params as an unrolled model's, for sampling: each layer's cache then updates
in place (in a scanned stack every decode step writes the whole stacked KV cache anew)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

# A scanned model is sampled with its layers unrolled (a copy of its params) up to this size: in
# a scanned stack every decode step writes the whole stacked KV cache anew (scan's outputs are new
# buffers); unrolled, each layer's cache is updated in place. smollm2_135m, 16 rows, 96 new
# tokens on CPU: 136 against 87 tokens/s.
UNROLL_MAX_BYTES = 2 << 30


@functools.partial(jax.jit, static_argnames="plan")
def _unstack(values, plan):
    return [values[k] if i < 0 else values[k][i] for k, i in plan]


@functools.cache
def _unrolled_layout(cfg):
    """(graphdef, flat abstract state) of an unrolled model of `cfg`: built once per config
    (tracing 30 layers' construction took 1-2 s of every sampling call)."""
    from jaxft.models.hf import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg))
    return graphdef, tuple(nnx.to_flat_state(abstract))


def sampling_split(model, *, unroll: bool | None = None):
    """(graphdef, state, config) to sample with: the model's own, or for a scanned model (up to
    UNROLL_MAX_BYTES of params, or whenever unroll=True) the same numbers as an unrolled model,
    each layer's params sliced from the stack. Models with layer groups (Gemma 4), and layouts
    this does not know (a leaf whose shape differs), stay as they are."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    if not cfg.scan_layers or cfg.grouped_layers or cfg.layer_specs() is not None or unroll is False:
        return graphdef, state, cfg
    source = list(nnx.to_flat_state(state))
    if unroll is None and sum(v.get_value().nbytes for _, v in source) > UNROLL_MAX_BYTES:
        return graphdef, state, cfg
    index = {path: k for k, (path, _) in enumerate(source)}
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled_graphdef, target = _unrolled_layout(unrolled_cfg)
    plan = []  # per unrolled leaf: (its scanned leaf, the layer to take or -1)
    for path, v in target:
        layer = len(path) > 1 and path[0] == "layers" and isinstance(path[1], int)
        k = index.get(("layers",) + path[2:] if layer else path)
        shape = None if k is None else source[k][1].get_value().shape[1 if layer else 0:]
        if shape != v.get_value().shape:
            return graphdef, state, cfg
        plan.append((k, path[1] if layer else -1))
    values = _unstack([v.get_value() for _, v in source], tuple(plan))
    state = nnx.from_flat_state([(path, v.replace(value=x)) for (path, v), x in zip(target, values)])
    return unrolled_graphdef, state, unrolled_cfg
