"""The layers of a model whose layers differ in shape (Gemma 4; MoE models with dense layers):
each layer's `LayerSpec`, run unrolled or as `LayerGroup`s (one `lax.scan` per group of a
repeating pattern, a stack per pattern position: compile time grows with the groups, not with
depth), with KV sharing (a KV-producing layer is a group of its own, so its keys and values
leave the scan whole), per-layer inputs, per-layer KV caches and router stats.

`ModelConfig.layer_specs` / `layer_groups` say what the layers are; `jaxft.models.decoder`
builds them (`Decoder.groups`: a list per group of stacked modules) and calls these runners.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.config import LayerSpec, ModelConfig
from jaxft.models.remat import remat


def layer_path(cfg: ModelConfig, i: int) -> tuple[tuple, int | None]:
    """Where layer i's params live in a model's state: (path prefix, index along its stacked
    axis, or None for an unrolled model's own module)."""
    if not cfg.scan_layers:
        return ("layers", i), None
    if not cfg.grouped_layers:
        return ("layers",), i
    for gi, g in enumerate(cfg.layer_groups()):
        if g.start <= i < g.start + g.period * g.repeats:
            rep, pos = divmod(i - g.start, g.period)
            return ("groups", gi, pos), rep
    raise IndexError(f"layer {i} of a {cfg.num_layers}-layer model")


def stack_router(routers: list):
    """Per-layer router stats (None for dense layers) stacked per MoE layer, in layer order
    (`jaxft.models.moe.router_stats`: [M, X] picks, [M, X] probs, [M] z), or None."""
    routers = [r for r in routers if r is not None]
    return None if not routers else tuple(jnp.stack(parts) for parts in zip(*routers))


def layer_call(spec: LayerSpec, graphdef, state, x, key, per_layer_input, shared_kv, cache, *, positions,
                     segment_ids, cache_index):
    """One layer of a model with `layer_specs`, from its graphdef and state: with those two
    bound, a pure function of arrays that can be rematerialised and scanned. Returns (x, new
    cache, (keys, values, key segment ids), router stats or None)."""
    layer = nnx.merge(graphdef, state)
    return layer(x, positions, segment_ids, cache, cache_index, rng=key, kind=spec.kind, shared_kv=shared_kv,
                 per_layer_input=per_layer_input)


def run_unrolled(cfg: ModelConfig, layers, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng, per_layer_BLNP):
    """Unrolled layers of a model with `layer_specs` (Gemma 4), one after another."""
    specs = cfg.layer_specs()
    keys = [None] * cfg.num_layers if rng is None else list(jax.random.split(rng, cfg.num_layers))
    kept, caches, segments, routers = {}, [], None, []
    for i, (layer, spec) in enumerate(zip(layers, specs)):
        graphdef, state = nnx.split(layer)
        run = functools.partial(layer_call, spec, graphdef, positions=positions_BL,
                                segment_ids=segment_ids_BL, cache_index=cache_index)
        if cache is None:
            run = remat(run, cfg.remat)
        layer_cache = None if cache is None or cache["layers"][i] is None else {
            **cache["layers"][i], "segment_ids": cache["segment_ids"]}
        ple = None if per_layer_BLNP is None else per_layer_BLNP[:, :, i]
        shared = None if spec.kv_from is None else kept[spec.kv_from]
        x_BLE, c, kv, router = run(state, x_BLE, keys[i], ple, shared, layer_cache)
        routers.append(router)
        if spec.keeps_kv:
            kept[i] = kv
        caches.append(None if c is None else {n: a for n, a in c.items() if n != "segment_ids"})
        segments = segments if c is None else c["segment_ids"]
    return (x_BLE, None if cache is None else {"layers": caches, "segment_ids": segments},
            stack_router(routers))


def run_scanned(cfg: ModelConfig, groups, x_BLE, positions_BL, segment_ids_BL, cache, cache_index, rng, per_layer_BLNP):
    """Scanned layers of a model with `layer_specs` (Gemma 4): each `LayerGroup` one
    `lax.scan` over its repeats, the pattern's layers one after another in the body. A layer
    whose keys and values later layers read is a group of its own (its spec is unique), so
    they come out of its scan whole."""
    specs = cfg.layer_specs()
    keys = None if rng is None else jax.random.split(rng, cfg.num_layers)
    kept, new_groups, segments, routers = {}, [], None, []
    for g, stacks, group_cache in zip(cfg.layer_groups(), groups,
                                      [None] * len(groups) if cache is None else cache["groups"]):
        index_RP = np.array([[g.layer(r, j) for j in range(g.period)] for r in range(g.repeats)])
        pattern = [specs[g.layer(0, j)] for j in range(g.period)]
        split = [nnx.split(stack) for stack in stacks]
        xs = ([state for _, state in split], None if keys is None else keys[index_RP],
              None if per_layer_BLNP is None else jnp.moveaxis(per_layer_BLNP[:, :, index_RP], (2, 3), (0, 1)),
              group_cache)

        def body(x, xs, pattern=pattern, split=split):
            states, keys_P, ple_P, caches_P = xs
            outs = []
            for j, spec in enumerate(pattern):
                run = functools.partial(layer_call, spec, split[j][0], positions=positions_BL,
                                        segment_ids=segment_ids_BL, cache_index=cache_index)
                if cache is None:
                    run = remat(run, cfg.remat)
                layer_cache = None if caches_P is None or caches_P[j] is None else {
                    **caches_P[j], "segment_ids": cache["segment_ids"]}
                x, c, kv, router = run(states[j], x, None if keys_P is None else keys_P[j],
                                       None if ple_P is None else ple_P[j],
                                       None if spec.kv_from is None else kept[spec.kv_from], layer_cache)
                outs.append((kv if spec.keeps_kv else None, c, router))
            return x, outs

        x_BLE, outs = jax.lax.scan(body, x_BLE, xs)
        group_caches = []
        for j, (kv, c, router) in enumerate(outs):
            routers += [] if router is None else [(router, [g.layer(r, j) for r in range(g.repeats)])]
            if kv is not None:
                kept[g.layer(0, j)] = jax.tree.map(lambda a: a[0], kv)
            group_caches.append(None if c is None else {n: a for n, a in c.items() if n != "segment_ids"})
            segments = segments if c is None else c["segment_ids"][0]
        new_groups.append(group_caches)
    if routers:  # [repeats, ...] per pattern position, put back in layer order
        order = np.argsort(np.concatenate([layers for _, layers in routers]))
        routers = tuple(jnp.concatenate(parts)[order] for parts in zip(*(stats for stats, _ in routers)))
    return x_BLE, None if cache is None else {"groups": new_groups, "segment_ids": segments}, routers or None


def cache_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The arrays each layer caches: keys and values, or (multi-head latent attention) the
    normed latent and the roped shared key."""
    return ("latent", "k_rope") if cfg.kv_lora_rank is not None else ("k", "v")


def layer_cache_shapes(cfg: ModelConfig, batch_size: int, max_length: int, kv_heads: int, head_dim: int) -> dict:
    """{name: shape} of one layer's cache: k / v [B, K, S, D] (heads-major: decode attention's
    dots read it without a transpose), or MLA's latent [B, S, R] and shared RoPE key [B, S, D_r]."""
    if cfg.kv_lora_rank is not None:
        return {"latent": (batch_size, max_length, cfg.kv_lora_rank),
                "k_rope": (batch_size, max_length, cfg.qk_rope_head_dim)}
    shape = (batch_size, kv_heads, max_length, head_dim)
    return {"k": shape, "v": shape}


def linear_cache_shapes(cfg: ModelConfig, batch_size: int) -> dict:
    """{name: (shape, float32?)} of a Gated DeltaNet layer's cache (`jaxft.models.linear_attention`):
    the recurrent state [B, Hv, Dk, Dv] in float32 and the conv window [B, K - 1, C]."""
    Hk, Dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    Hv, Dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    return {"state": ((batch_size, Hv, Dk, Dv), True),
            "conv": ((batch_size, cfg.linear_conv_kernel - 1, 2 * Hk * Dk + Hv * Dv), False)}


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache with each layer's own shape (per LayerGroup stack when scanned) and
    nothing for layers that read another layer's keys and values."""
    dtype = dtype or cfg.compute_dtype
    specs = cfg.layer_specs()
    segments = jnp.zeros((batch_size, max_length), jnp.int32)

    def kv(spec, lead=()):
        if spec.kv_from is not None:
            return None
        if spec.linear:  # a Gated DeltaNet layer: its recurrent state (float32) and conv window
            return {n: jnp.zeros(lead + shape, jnp.float32 if f32 else dtype)
                    for n, (shape, f32) in linear_cache_shapes(cfg, batch_size).items()}
        shapes = layer_cache_shapes(cfg, batch_size, max_length, spec.kv_heads, spec.head_dim)
        return {n: jnp.zeros(lead + shape, dtype) for n, shape in shapes.items()}

    if not cfg.scan_layers:
        return {"layers": [kv(spec) for spec in specs], "segment_ids": segments}
    return {"groups": [[kv(specs[g.layer(0, j)], (g.repeats,)) for j in range(g.period)]
                       for g in cfg.layer_groups()], "segment_ids": segments}
