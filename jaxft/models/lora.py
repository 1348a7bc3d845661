"""LoRA adapters on the decoder's projections: y = x W + (alpha / r) * (x A) B.

An adapted projection carries two extra variables next to its kernel, `{name}_lora_a`
(in dims + [r]) and `{name}_lora_b` ([r] + out dims), of type `LoRAParam`, which is not an
`nnx.Param`: everything that reads or writes a model's weights (HF load and save, full
fine-tuning) sees the base only, and a LoRA run splits a model into
`(graphdef, adapters, base) = nnx.split(model, LoRAParam, nnx.Param)`.

A is drawn as PEFT draws it (kaiming-uniform, bound 1 / sqrt(fan_in)) and B starts at zero,
so an adapted model starts equal to its base. Adapters are float32 whatever the base dtype
(as PEFT's `autocast_adapter_dtype`), carry the logical axes of the dims they share with
the kernel (the rank axis is replicated) and so shard like it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import ConfigError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


class LoRAParam(nnx.Variable):
    """A trainable adapter weight (A or B); the base's `nnx.Param`s stay frozen."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # projection names from PROJECTIONS
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank
    dropout: float = 0.0  # on each adapter's input, in training steps only (PEFT's lora_dropout)

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1 for adapters (0 = full fine-tuning); got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1); got {self.dropout}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets {list(self.targets)}: choose from {', '.join(PROJECTIONS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def resolve_targets(text: str, *, key: str = "lora.targets") -> tuple[str, ...]:
    """"all-linear", a comma list of projection names ("q_proj,v_proj"), or a regular
    expression searched in qualified names ("self_attn.q_proj", "mlp.down_proj")."""
    text = text.strip()
    if text == ALL_LINEAR:
        return PROJECTIONS
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names and all(n in PROJECTIONS for n in names):
        return tuple(n for n in PROJECTIONS if n in names)
    qualified = {n: ("self_attn." if n in ATTENTION_PROJECTIONS else "mlp.") + n for n in PROJECTIONS}
    try:
        pattern = re.compile(text)
    except re.error as err:
        raise ConfigError(f"config key {key}: {text!r} is neither projection names nor a valid regex ({err})") from None
    found = tuple(n for n in PROJECTIONS if pattern.search(qualified[n]))
    if not found:
        raise ConfigError(
            f"config key {key}: {text!r} matches no projection; use {ALL_LINEAR!r}, names from "
            f"{', '.join(PROJECTIONS)}, or a regex over {', '.join(qualified.values())}"
        )
    return found


def projection_dims(cfg, name: str) -> tuple[tuple, tuple, tuple, tuple]:
    """(in shape, in logical axes, out shape, out logical axes) of projection `name`'s kernel."""
    E, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    return {
        "q_proj": ((E,), ("embed",), (H, D), ("q_heads", "head_dim")),
        "k_proj": ((E,), ("embed",), (K, D), ("kv_heads", "head_dim")),
        "v_proj": ((E,), ("embed",), (K, D), ("kv_heads", "head_dim")),
        "o_proj": ((H, D), ("q_heads", "head_dim"), (E,), ("embed",)),
        "gate_proj": ((E,), ("embed",), (F,), ("mlp",)),
        "up_proj": ((E,), ("embed",), (F,), ("mlp",)),
        "down_proj": ((F,), ("mlp",), (E,), ("embed",)),
    }[name]


def layer_projections(cfg, layer: int) -> tuple:
    """(layer `layer`'s config, the projections it has): every projection with the model's
    shape, except in a model with `layer_specs` (Gemma 4), where a layer has its own shape and
    no v_proj when its values are its keys, no k_proj / v_proj when it reads another layer's,
    and in an MoE layer, whose MLP is routed experts (no dense gate / up / down projection)."""
    specs = cfg.layer_specs()
    moe = set(MLP_PROJECTIONS) if cfg.is_moe_layer(layer) else set()  # adapters on experts: not yet
    if specs is None:
        return cfg, tuple(n for n in PROJECTIONS if n not in moe)
    spec = specs[layer]
    missing = {f"{n}_proj" for n in ("k", "v") if n not in spec.projections}
    return cfg.layer_config(spec), tuple(n for n in PROJECTIONS if n not in missing | moe)


def num_adapter_params(cfg) -> int:
    """Trainable params of cfg.lora's adapters over all layers (0 without LoRA)."""
    if cfg.lora is None:
        return 0
    total = 0
    for layer in range(cfg.num_layers):
        layer_cfg, names = layer_projections(cfg, layer)
        total += sum(cfg.lora.rank * (math.prod(i) + math.prod(o)) for i, _, o, _ in
                     (projection_dims(layer_cfg, n) for n in cfg.lora.targets if n in names))
    return total


def add_adapters(module: nnx.Module, cfg, names, rngs: nnx.Rngs | None) -> None:
    """Gives `module` A and B for each of `names` that cfg.lora targets (none without LoRA)."""
    spec = cfg.lora
    if spec is None:
        return
    for name in names:
        if name not in spec.targets:
            continue
        in_shape, in_axes, out_shape, out_axes = projection_dims(cfg, name)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), in_shape + (spec.rank,), jnp.float32, -bound, bound)
        setattr(module, f"{name}_lora_a", LoRAParam(a, logical_axes=in_axes + ("lora_rank",)))
        b = jnp.zeros((spec.rank,) + out_shape, jnp.float32)
        setattr(module, f"{name}_lora_b", LoRAParam(b, logical_axes=("lora_rank",) + out_axes))


def adapt(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, spec: LoRASpec | None,
          rng: jax.Array | None = None) -> jax.Array:
    """y + scale * (dropout(x) A) B for an adapted projection `name` of `module`; y itself
    otherwise. x: [..., *in dims] (the projection's input); y: [..., *out dims] (its base
    output); rng: the layer's dropout key (None: no dropout, as in eval and generation)."""
    if spec is None or name not in spec.targets:
        return y
    if rng is not None and spec.dropout > 0:
        keep = 1.0 - spec.dropout
        mask = jax.random.bernoulli(jax.random.fold_in(rng, PROJECTIONS.index(name)), keep, x.shape)
        x = jnp.where(mask, x / keep, jnp.zeros_like(x))
    a = getattr(module, f"{name}_lora_a")[...].astype(x.dtype)
    b = getattr(module, f"{name}_lora_b")[...].astype(x.dtype)
    h = jnp.tensordot(x, a, axes=a.ndim - 1)  # [..., r]
    return y + (jnp.tensordot(h, b, axes=1) * spec.scale).astype(y.dtype)
