"""What a family row is (`Family`) and what every row's config reader shares."""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # what `save_hf` writes as `architectures`
    parts: Callable[[dict, str], dict]  # family-specific ModelConfig kwargs from config.json
    hf_keys: Callable[[dict], dict]  # family-specific config.json keys from ModelConfig fields
    keys: frozenset = frozenset()  # config.json keys `parts` consumes
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    # Fused HF tensors: {fused suffix: ((part suffix, rows), ...)} in order along axis 0, rows
    # as a function of the parts (e.g. H * D).
    fused: Callable[[dict], dict] | None = None
    # MoE tensor names: (module, router, experts, gate, up, down) as in
    # `{module}.{router}.weight` and `{module}.{experts}.{x}.{gate}.weight`.
    experts: tuple[str, str, str, str, str, str] | None = None
    shared_experts: str = "shared_expert"  # `{module}.{shared_experts}.{gate,up,down}_proj.weight`
    # gpt-oss: every expert of a layer in one tensor per projection, `{module}.{experts}.{gate}`
    # [X, in, out] (and `..._bias` [X, out]), not one Linear per expert
    stacked_experts: bool = False
    # Tensors whose parts alternate along the last axis: ((fused suffix, part suffixes), ...), part j
    # = fused[..., j::n] (gpt-oss's gate_up_proj: gate in the even columns, up in the odd)
    interleaved: tuple[tuple[str, tuple[str, ...]], ...] = ()


def activation(hf: dict, source: str, allowed: dict) -> str:
    """The config's hidden activation as jaxft names it (`allowed`: {HF name: ours}), or a ConfigError."""
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if name not in allowed:
        raise ConfigError(f"{source}: hidden activation {name!r} is not supported for "
                          f"{hf.get('model_type')} (supported: {', '.join(allowed)})")
    return allowed[name]
