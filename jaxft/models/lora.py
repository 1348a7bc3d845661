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

A target names a projection wherever it is: `gate_proj` adapts a dense MLP's gate, a shared
expert's (`shared_gate_proj`, its own A and B) and every routed expert's, as PEFT's
`target_modules` name matching does. Routed experts get one pair per expert stacked along the
experts axis, A [X, in, r] and B [X, r, out]; the MoE layer runs them in its grouped matmuls
(each row through its expert's A, then B). DeepSeek's multi-head latent attention adds its own
projections (`MLA_PROJECTIONS`; q_proj and o_proj as elsewhere).
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
MLA_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # DeepSeek (jaxft.models.mla)
# Qwen3.5's Gated DeltaNet layers (jaxft.models.linear_attention), PEFT's names for them
LINEAR_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + MLA_PROJECTIONS + LINEAR_PROJECTIONS  # order: dropout keys' indices
SHARED = "shared_"  # an MoE layer's shared-expert kernels: shared_gate_proj, shared_up_proj, shared_down_proj
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
    qualified = {n: _module_of(n) + "." + n for n in PROJECTIONS}
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


def _module_of(name: str) -> str:
    """The transformers module a projection sits in below the layer: mlp, self_attn, linear_attn."""
    return "mlp" if name in MLP_PROJECTIONS else "linear_attn" if name in LINEAR_PROJECTIONS else "self_attn"


def target_of(name: str) -> str:
    """The projection a kernel is: "shared_gate_proj" is a gate_proj (`SHARED`)."""
    return name.removeprefix(SHARED)


def projection_dims(cfg, name: str, *, experts: bool = False) -> tuple[tuple, tuple, tuple, tuple]:
    """(in shape, in logical axes, out shape, out logical axes) of projection `name`'s kernel:
    a dense MLP's F is intermediate_size, a shared expert's (`SHARED` names) shared_expert_size,
    a routed expert's (`experts`; one expert's kernel, without the experts axis) expert_size.
    On a multi-head latent attention model q_proj and o_proj have its head dims."""
    E, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    if name.startswith(SHARED):
        F, name = cfg.shared_expert_size, target_of(name)
    elif experts:
        F = cfg.expert_size
    if cfg.kv_lora_rank is not None and name in ("q_proj", "o_proj") + MLA_PROJECTIONS:
        return _mla_dims(cfg, name)
    if name in LINEAR_PROJECTIONS:
        return _linear_dims(cfg, name)
    Dq = 2 * D if cfg.attn_output_gate else D  # Qwen3.5: each head's query, then its output gate
    return {
        "q_proj": ((E,), ("embed",), (H, Dq), ("q_heads", "head_dim")),
        "k_proj": ((E,), ("embed",), (K, D), ("kv_heads", "head_dim")),
        "v_proj": ((E,), ("embed",), (K, D), ("kv_heads", "head_dim")),
        "o_proj": ((H, D), ("q_heads", "head_dim"), (E,), ("embed",)),
        "gate_proj": ((E,), ("embed",), (F,), ("mlp",)),
        "up_proj": ((E,), ("embed",), (F,), ("mlp",)),
        "down_proj": ((F,), ("mlp",), (E,), ("embed",)),
    }[name]


def _mla_dims(cfg, name: str) -> tuple[tuple, tuple, tuple, tuple]:
    E, H, R, Q = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    Dqk, Dr, Dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return {
        "q_proj": ((E,), ("embed",), (H, Dqk), ("q_heads", "head_dim")),
        "q_a_proj": ((E,), ("embed",), (Q,), ("q_lora",)),
        "q_b_proj": ((Q,), ("q_lora",), (H, Dqk), ("q_heads", "head_dim")),
        "kv_a_proj_with_mqa": ((E,), ("embed",), (R + Dr,), ("kv_lora",)),
        "kv_b_proj": ((R,), ("kv_lora",), (H, cfg.qk_nope_head_dim + Dv), ("q_heads", "head_dim")),
        "o_proj": ((H, Dv), ("q_heads", "head_dim"), (E,), ("embed",)),
    }[name]


def _linear_dims(cfg, name: str) -> tuple[tuple, tuple, tuple, tuple]:
    """A Gated DeltaNet layer's projections (`jaxft.models.linear_attention`): 2D kernels."""
    E, Hk, Dk = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_key_head_dim
    Hv, Dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    out = {"in_proj_qkv": 2 * Hk * Dk + Hv * Dv, "in_proj_z": Hv * Dv, "in_proj_b": Hv, "in_proj_a": Hv}
    if name == "out_proj":
        return (Hv * Dv,), (None,), (E,), ("embed",)
    return (E,), ("embed",), (out[name],), (None,)


def attention_projections(cfg) -> tuple[str, ...]:
    """The attention projections of a layer: multi-head latent attention's when cfg has a
    latent rank (q_proj, or q_a_proj and q_b_proj with a query rank), else q / k / v / o."""
    if cfg.kv_lora_rank is None:
        return ATTENTION_PROJECTIONS
    queries = ("q_a_proj", "q_b_proj") if cfg.q_lora_rank else ("q_proj",)
    return queries + ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def model_targets(cfg) -> tuple[str, ...]:
    """cfg.lora's targets that the model has in some layer (a Llama has no kv_b_proj)."""
    have = set(attention_projections(cfg)) | set(MLP_PROJECTIONS)
    if cfg.linear_num_value_heads:
        have |= set(LINEAR_PROJECTIONS)
    return tuple(t for t in cfg.lora.targets if t in have)


def layer_kernels(cfg, layer: int) -> tuple[str, ...]:
    """The kernels layer `layer` has, by name: the attention's (`attention_projections`) and the
    MLP's gate / up / down, which in an MoE layer (`cfg.is_moe_layer`) are the routed experts',
    followed by the shared expert's `SHARED` names when it has one. In a model with
    `layer_specs` (Gemma 4) a layer has no v_proj when its values are its keys, no k_proj /
    v_proj when it reads another layer's."""
    moe = cfg.is_moe_layer(layer)
    names = attention_projections(cfg) + MLP_PROJECTIONS
    names += tuple(SHARED + n for n in MLP_PROJECTIONS) if moe and cfg.shared_expert_size else ()
    specs = cfg.layer_specs()
    if specs is None:
        return names
    if specs[layer].linear:  # a Gated DeltaNet layer: its projections instead of attention's
        return LINEAR_PROJECTIONS + names[len(attention_projections(cfg)):]
    missing = {f"{n}_proj" for n in ("k", "v") if n not in specs[layer].projections}
    return tuple(n for n in names if n not in missing)


def layer_projections(cfg, layer: int) -> tuple:
    """(layer `layer`'s config, `layer_kernels`): Gemma 4's layers have their own shapes."""
    specs = cfg.layer_specs()
    return (cfg if specs is None else cfg.layer_config(specs[layer])), layer_kernels(cfg, layer)


def adapter_shapes(cfg, name: str, *, experts: bool = False) -> tuple[tuple, tuple, tuple, tuple]:
    """(A's shape, A's logical axes, B's shape, B's logical axes) of kernel `name`'s adapter
    under cfg.lora; a routed expert's (`experts`) are stacked on a leading experts axis."""
    in_shape, in_axes, out_shape, out_axes = projection_dims(cfg, name, experts=experts)
    lead, lead_axes = ((cfg.num_experts,), ("experts",)) if experts else ((), ())
    r = cfg.lora.rank
    return (lead + in_shape + (r,), lead_axes + in_axes + ("lora_rank",),
            lead + (r,) + out_shape, lead_axes + ("lora_rank",) + out_axes)


def num_adapter_params(cfg, *, active: bool = False) -> int:
    """Trainable params of cfg.lora's adapters over all layers (0 without LoRA); `active`: the
    routed experts' counted for the k experts a token uses (FLOPs), not all of them (memory)."""
    if cfg.lora is None:
        return 0
    total = 0
    for layer in range(cfg.num_layers):
        layer_cfg, names = layer_projections(cfg, layer)
        moe = cfg.is_moe_layer(layer)
        for name in names:
            if target_of(name) in cfg.lora.targets:
                experts = moe and name in MLP_PROJECTIONS
                a, _, b, _ = adapter_shapes(layer_cfg, name, experts=experts)
                n = math.prod(a) + math.prod(b)
                total += n // cfg.num_experts * cfg.experts_per_token if experts and active else n
    return total


def add_adapters(module: nnx.Module, cfg, names, rngs: nnx.Rngs | None, *, experts: bool = False) -> None:
    """Gives `module` A and B for each kernel of `names` that cfg.lora targets (none without
    LoRA); `experts`: the kernels are routed experts' (one pair per expert, `adapter_shapes`)."""
    spec = cfg.lora
    if spec is None:
        return
    for name in names:
        if target_of(name) not in spec.targets:
            continue
        a_shape, a_axes, b_shape, b_axes = adapter_shapes(cfg, name, experts=experts)
        bound = 1.0 / math.sqrt(math.prod(projection_dims(cfg, name, experts=experts)[0]))
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        setattr(module, f"{name}_lora_a", LoRAParam(a, logical_axes=a_axes))
        setattr(module, f"{name}_lora_b", LoRAParam(jnp.zeros(b_shape, jnp.float32), logical_axes=b_axes))


def _dropout(x: jax.Array, name: str, spec: LoRASpec, rng: jax.Array | None, kind: int) -> jax.Array:
    """x with PEFT's lora_dropout in training (`rng`); one key per projection and kind (0 a
    plain kernel, 1 a shared expert's, 2 the routed experts')."""
    if rng is None or spec.dropout <= 0:
        return x
    keep = 1.0 - spec.dropout
    index = PROJECTIONS.index(target_of(name)) + kind * len(PROJECTIONS)
    mask = jax.random.bernoulli(jax.random.fold_in(rng, index), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def adapt(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, spec: LoRASpec | None,
          rng: jax.Array | None = None) -> jax.Array:
    """y + scale * (dropout(x) A) B for an adapted projection `name` of `module`; y itself
    otherwise. x: [..., *in dims] (the projection's input); y: [..., *out dims] (its base
    output); rng: the layer's dropout key (None: no dropout, as in eval and generation)."""
    if spec is None or target_of(name) not in spec.targets:
        return y
    x = _dropout(x, name, spec, rng, 1 if name.startswith(SHARED) else 0)
    a = getattr(module, f"{name}_lora_a")[...].astype(x.dtype)
    b = getattr(module, f"{name}_lora_b")[...].astype(x.dtype)
    h = jnp.tensordot(x, a, axes=a.ndim - 1)  # [..., r]
    return y + (jnp.tensordot(h, b, axes=1) * spec.scale).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class ExpertAdapters:
    """One MoE layer's routed-expert adapters as arrays, {projection: (A [X, in, r], B [X, r,
    out])}, with the spec and the layer's dropout key. `dropless_experts` calls it on each
    projection's rows grouped by expert: y + scale * (x A[e]) B[e] per row, as two grouped
    matmuls of its layout. Expert parallelism splits `pairs` over devices with the experts."""

    pairs: dict
    spec: LoRASpec
    rng: jax.Array | None = None

    def __call__(self, name: str, x_P: jax.Array, y_P: jax.Array, matmul, groups) -> jax.Array:
        """x_P [P, in] rows, y_P [P, out] their base outputs, `matmul(rows, w [X, ...], groups)`
        the layer's grouped matmul (`jaxft.models.grouped_matmul`)."""
        if name not in self.pairs:
            return y_P
        x_P = _dropout(x_P, name, self.spec, self.rng, 2)
        a, b = (w.astype(x_P.dtype) for w in self.pairs[name])
        return y_P + (matmul(matmul(x_P, a, groups), b, groups) * self.spec.scale).astype(y_P.dtype)


def expert_adapters(module: nnx.Module, spec: LoRASpec | None, rng: jax.Array | None = None):
    """The `ExpertAdapters` of MoE `module`'s routed experts; None when spec adapts none."""
    if spec is None:
        return None
    pairs = {n: (getattr(module, f"{n}_lora_a")[...], getattr(module, f"{n}_lora_b")[...])
             for n in MLP_PROJECTIONS if n in spec.targets}
    return ExpertAdapters(pairs, spec, rng) if pairs else None
