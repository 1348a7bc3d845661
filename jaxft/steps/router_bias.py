"""DeepSeek-V3's auxiliary-loss-free load balancing, applied after each optimizer update: every
MoE layer's `e_score_correction_bias` (which selects experts but never weights them, and gets
no gradient) moves by `train.router_bias_update_rate` towards even expert load over the step's
batch (`jaxft.losses.bias_balancing_update`). A step that skipped its update (non-finite loss
or gradients) leaves the biases as they were too.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxft import losses
from jaxft.models.config import ModelConfig
from jaxft.models.layer_groups import layer_path

BIAS = ("mlp", "e_score_correction_bias")


def bias_rows(cfg: ModelConfig) -> dict[tuple, tuple[np.ndarray | None, np.ndarray]]:
    """{state path of a bias leaf: (its rows along the stacked-layer axis, or None for one
    layer's own leaf; those layers' places among the MoE layers)}: where each MoE layer's bias
    lives, MoE layers counted in order as the model reports their routing."""
    rows: dict[tuple, list] = {}
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    for m, i in enumerate(moe_layers):
        prefix, index = layer_path(cfg, i)
        rows.setdefault(prefix + BIAS, []).append((index, m))
    return {path: (None if entries[0][0] is None else np.array([index for index, _ in entries]),
                   np.array([m for _, m in entries])) for path, entries in rows.items()}


def balance_router_bias(graphdef, state: dict, picks_MX, rate: float, skipped) -> dict:
    """`state` with each MoE layer's selection bias moved by `rate` towards even load (`picks_MX`:
    the step's picks per MoE layer), unless the step was `skipped` (1.0)."""
    cfg = nnx.merge(graphdef, state["params"]).cfg
    delta_MX = losses.bias_balancing_update(picks_MX, rate) * (1.0 - skipped)
    rows = bias_rows(cfg)

    def move(path, leaf):
        key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if key not in rows:
            return leaf
        index, moe_index = rows[key]
        delta = delta_MX[moe_index].astype(leaf.dtype)
        return leaf + delta[0] if index is None else leaf.at[index].add(delta)

    return {**state, "params": jax.tree_util.tree_map_with_path(move, state["params"])}
