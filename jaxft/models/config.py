"""ModelConfig: the architecture of one decoder as a set of parts, read from and written to HF
`config.json`.

One dataclass covers every family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3,
Phi-3 / Phi-4); a family is a choice of parts: norm kind and placement, MLP activation,
embedding scale, soft-caps, attention scale, QK-norm, biases, per-layer attention kinds (window
and RoPE). `jaxft.models.families` maps each family's `config.json` to these parts and back;
both dialects are read: transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype` at top
level) and 5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxft.errors import ConfigError, DataError, PathError
from jaxft.models import families
from jaxft.models.lora import LINEAR_PROJECTIONS, LoRASpec, attention_projections
from jaxft.models.remat import normalize_remat
from jaxft.models.rope import Rope

NORMS = ("rms", "rms_plus_one", "rms_f32")  # x * w (Llama), x * (1 + w) in float32 (Gemma 2 / 3), x * w in float32 (Gemma 4)
ACTIVATIONS = ("silu", "gelu_tanh", "clamped_swiglu")  # SwiGLU, GeGLU with tanh-GELU (Gemma), gpt-oss's (parts.gated)
ROUTER_SCORINGS = ("softmax", "sigmoid")  # expert scores: Mixtral / Qwen / DeepSeek-V2, DeepSeek-V3
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")  # linear: Gated DeltaNet (Qwen3.5)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What differs between a model's layers: the sliding window (None: full) and the RoPE."""

    window: int | None
    rope: Rope


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a model whose layers differ in shape (Gemma 4): its kind (index into
    `layer_kinds()`), attention shape, where its keys and values come from, and MLP width.

    kv_from: None (own k / v projections) or the earlier layer whose keys and values it reads
    (Gemma 4's KV sharing); keeps_kv: later layers read this layer's keys and values."""

    kind: int
    head_dim: int
    kv_heads: int
    values_from_keys: bool  # Gemma 4's attention_k_eq_v on full layers: no v_proj
    kv_from: int | None
    keeps_kv: bool
    mlp_size: int
    moe: bool = False  # a mixture-of-experts MLP (jaxft.models.moe) instead of a dense one
    linear: bool = False  # a Gated DeltaNet mixer (jaxft.models.linear_attention) instead of attention

    @property
    def projections(self) -> tuple[str, ...]:
        """The attention input projections this layer has (q always; k and v unless it reads
        another layer's keys and values; no v when its values are its keys; none in a linear
        layer)."""
        if self.linear:
            return ()
        if self.kv_from is not None:
            return ("q",)
        return ("q", "k") if self.values_from_keys else ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers start .. start + period * repeats - 1, a pattern of `period` layers repeated: one
    `lax.scan` over the repeats, each pattern position a stack of `repeats` layers."""

    start: int
    period: int
    repeats: int

    def layer(self, rep: int, pos: int) -> int:
        return self.start + rep * self.period + pos

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def parse_dtype(name: Any, *, key: str = "dtype") -> Any:
    """Maps 'bfloat16' / 'float32' / a jnp dtype to a jnp dtype; `key` names the config field."""
    if name is None:
        return None
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return _DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(
            f"{key}={name!r} is not a supported dtype; use one of {sorted(set(_DTYPES))}"
        ) from None


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    Shapes: V vocab_size, E hidden_size, F intermediate_size, H num_heads,
    K num_kv_heads (GQA groups), D head_dim, N num_layers.
    """

    model_type: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    o_bias: bool = False  # Llama `attention_bias=True` also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # the last W keys only: every layer, or those layer_types say
    # Parts (Gemma 2 / 3, Phi-3): each default is the Llama choice.
    norm: str = "rms"  # NORMS: "rms_plus_one" is Gemma's x * (1 + w), computed in float32
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP too (pre- and post-)
    activation: str = "silu"  # ACTIVATIONS: the MLP's gate activation
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the compute dtype
    attn_logit_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap) in attention
    final_logit_softcap: float | None = None  # Gemma 2: cap * tanh(logits / cap) on the output
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this ** -0.5, not D ** -0.5
    partial_rotary_factor: float = 1.0  # Phi-3.5 / Phi-4-mini: RoPE on this fraction of a head
    # Per-layer attention kinds (Gemma 2's alternation, Gemma 3's 5:1): one of LAYER_TYPES per
    # layer; None = every layer alike. Sliding layers may have their own RoPE (Gemma 3: 10k).
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # sliding layers' theta (None: rope_theta)
    local_rope_scaling: dict | None = None  # sliding layers' scaling (used when local_rope_theta is set)
    # Gemma 4: layers of different shapes (full layers' own head dim and kv heads, values equal
    # to keys), values RMS-normed, a stored scalar on each layer's output, per-layer input
    # embeddings (PLE), the last layers reading earlier layers' keys and values, and those
    # layers' MLPs twice as wide.
    global_head_dim: int | None = None  # full-attention layers' head dim (None: head_dim)
    global_kv_heads: int | None = None  # full-attention layers' kv heads (None: num_kv_heads)
    attention_k_eq_v: bool = False  # full layers: values are the key projection (no v_proj)
    v_norm: bool = False  # values RMS-normed over head_dim (no scale)
    layer_scalar: bool = False  # each layer's output times its stored (frozen) scalar
    per_layer_input_size: int = 0  # PLE width per layer (hidden_size_per_layer_input); 0: none
    per_layer_vocab_size: int | None = None  # PLE table rows (None: vocab_size)
    num_kv_shared_layers: int = 0  # the last this many layers read earlier layers' k / v
    double_wide_mlp: bool = False  # KV-shared layers' MLPs twice intermediate_size
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): routed experts instead of the MLP.
    num_experts: int = 0  # routed experts per MoE layer; 0 = dense MLPs
    experts_per_token: int = 2  # k: experts each token is routed to
    moe_intermediate_size: int | None = None  # each expert's hidden width (None: intermediate_size)
    norm_topk_prob: bool = True  # the k routing weights renormalised to sum to 1
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert (a dense gated MLP); 0: none
    shared_expert_gate: bool = False  # the shared expert's output times sigmoid(gate(x))
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP (Qwen's mlp_only_layers)
    # DeepSeek routing (jaxft.models.moe.route): softmax or sigmoid scores, top k within the best
    # router_topk_groups of router_groups expert groups, a frozen per-expert selection bias
    # (V3's e_score_correction_bias), the weights times routed_scaling_factor.
    router_scoring: str = "softmax"  # ROUTER_SCORINGS
    router_groups: int = 1  # n_group (1: no group limit)
    router_topk_groups: int = 1  # topk_group
    router_bias: bool = False  # e_score_correction_bias: selects, never weights, never trained
    routed_scaling_factor: float = 1.0
    router_f32: bool = False  # router logits in float32 whatever the compute dtype (DeepSeek)
    # gpt-oss: the router a Linear with a (trained) bias, experts with biases on gate / up / down,
    # the clamped SwiGLU's limit and sigmoid gain (activation "clamped_swiglu"), and attention
    # sinks (a learned logit per query head in each softmax's denominator).
    router_logit_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_sinks: bool = False
    # Multi-head latent attention (DeepSeek-V2 / V3, jaxft.models.mla) when kv_lora_rank is set.
    kv_lora_rank: int | None = None  # R: the latent keys and values come from (and the cache holds)
    q_lora_rank: int | None = None  # queries through a rank-Q bottleneck (None: one q_proj)
    qk_nope_head_dim: int = 0  # per-head key / query dims without RoPE
    qk_rope_head_dim: int = 0  # per-head query dims with RoPE; the one shared RoPE key's width
    v_head_dim: int = 0  # per-head value dims
    rope_interleave: bool = False  # the RoPE dims stored as interleaved pairs (DeepSeek)
    # Qwen3.5: Gated DeltaNet layers where layer_types says linear_attention (jaxft.models.
    # linear_attention), and full attention with an output gate (q_proj emits each head's query
    # and gate; the output times sigmoid(gate)).
    attn_output_gate: bool = False
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4  # the depthwise causal conv's width (linear_conv_kernel_dim)
    linear_chunk_size: int | None = None  # the chunked delta rule's chunk (None: gated_deltanet's default; not in config.json)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: str = "none"  # what layers recompute in the backward pass (jaxft.models.remat)
    scan_layers: bool = True  # layers stacked and scanned: compile time independent of depth
    attention: str = "auto"  # attention backend (jaxft.models.attention.BACKENDS, or "auto")
    moe_matmul: str = "auto"  # experts' grouped-matmul layout (jaxft.models.grouped_matmul.LAYOUTS, or "auto")
    lora: LoRASpec | None = None  # adapters on the projections (jaxft.models.lora); None = none
    # Keys of the source config.json we do not model, written back unchanged on save.
    extra_hf_config: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "remat", normalize_remat(self.remat))
        families.family(self.model_type)  # a clear error naming the supported ones
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for key, value, allowed in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                    ("router_scoring", self.router_scoring, ROUTER_SCORINGS)):
            if value not in allowed:
                raise ConfigError(f"model {key}={value!r} is not supported; use one of {', '.join(allowed)}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types must give one of {', '.join(LAYER_TYPES)} for each of the "
                    f"{self.num_layers} layers; got {len(self.layer_types)} entries{', unknown ' + str(bad) if bad else ''}")
        if self.layer_types is not None and "linear_attention" in self.layer_types:
            Hk, Hv = self.linear_num_key_heads, self.linear_num_value_heads
            if not (Hk > 0 and Hv > 0 and Hv % Hk == 0 and self.linear_key_head_dim > 0
                    and self.linear_value_head_dim > 0 and self.linear_conv_kernel >= 1):
                raise ConfigError(f"linear_attention layers need linear_num_key_heads ({Hk}) and "
                                  f"linear_num_value_heads ({Hv}) > 0, the value heads a multiple of the key heads, "
                                  "positive linear_key_head_dim / linear_value_head_dim and linear_conv_kernel_dim")
        self.layer_kinds()  # RoPE kinds checked here (a clear error for an unsupported scaling)
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.experts_per_token} must be in 1..num_experts={self.num_experts}")
        if self.num_experts and (self.router_groups < 1 or self.num_experts % self.router_groups
                                 or not 1 <= self.router_topk_groups <= self.router_groups):
            raise ConfigError(f"n_group={self.router_groups} must divide n_routed_experts={self.num_experts} and "
                              f"topk_group={self.router_topk_groups} must be in 1..n_group")
        if self.num_kv_shared_layers:
            self.layer_specs()  # a clear error when a shared layer has no earlier layer of its type
        if self.lora is not None:
            have = set(attention_projections(self)) | {"gate_proj", "up_proj", "down_proj"}  # some layer has each
            if self.linear_num_value_heads:
                have |= set(LINEAR_PROJECTIONS)
            if not have & set(self.lora.targets):
                raise ConfigError(f"lora.targets={','.join(self.lora.targets)}: this {self.model_type} model has none "
                                  f"of these projections; it has {','.join(sorted(have))}")

    def __hash__(self):  # a static argument of jit (inside GraphDefs): RoPE dicts hashed by items
        return hash(tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.compare))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def layer_kinds(self) -> tuple[tuple[LayerKind, ...], tuple[int, ...]]:
        """(the distinct LayerKinds, each layer's index into them). One kind for Llama-style
        models (a sliding window, if set, on every layer); Gemma's full and sliding layers two."""
        rope = Rope(self.rope_theta, self.rope_scaling, self.partial_rotary_factor, self.max_position_embeddings)
        if self.layer_types is None:
            return (LayerKind(self.sliding_window or None, rope),), (0,) * self.num_layers
        local_rope = rope if self.local_rope_theta is None else Rope(
            self.local_rope_theta, self.local_rope_scaling, self.partial_rotary_factor, self.max_position_embeddings)
        by_type = {"full_attention": LayerKind(None, rope), "linear_attention": LayerKind(None, rope),
                   "sliding_attention": LayerKind(self.sliding_window or None, local_rope)}
        kinds = tuple(dict.fromkeys(by_type[t] for t in self.layer_types))
        return kinds, tuple(kinds.index(by_type[t]) for t in self.layer_types)

    def layer_specs(self) -> tuple[LayerSpec, ...] | None:
        """Each layer's LayerSpec when layers differ in shape or share keys and values (Gemma 4),
        else None: every layer has the model's shape and the stack is one scan."""
        if not self.grouped_layers:
            return None
        index = self.layer_kinds()[1]
        types = self.layer_types or ("full_attention",) * self.num_layers
        first_shared = self.num_layers - self.num_kv_shared_layers
        producer = {t: max((i for i in range(first_shared) if types[i] == t), default=None) for t in set(types)}
        specs = []
        for i, t in enumerate(types):
            full = t == "full_attention"
            shared = i >= first_shared
            if shared and producer[t] is None:
                raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers}: layer {i} ({t}) reads the "
                                  f"keys and values of an earlier {t} layer, and there is none before layer {first_shared}")
            specs.append(LayerSpec(
                kind=index[i], head_dim=(self.global_head_dim or self.dim_per_head) if full else self.dim_per_head,
                kv_heads=(self.global_kv_heads or self.num_kv_heads) if full else self.num_kv_heads,
                values_from_keys=self.attention_k_eq_v and full, kv_from=producer[t] if shared else None,
                keeps_kv=self.num_kv_shared_layers > 0 and i == producer[t],
                mlp_size=self.intermediate_size * (2 if self.double_wide_mlp and shared else 1),
                moe=self.is_moe_layer(i), linear=t == "linear_attention"))
        return tuple(specs)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def grouped_layers(self) -> bool:
        """Whether the layers are built per LayerSpec (`layer_specs`, `layer_groups`)."""
        return bool(self.global_head_dim not in (None, self.dim_per_head)
                    or self.global_kv_heads not in (None, self.num_kv_heads) or self.attention_k_eq_v
                    or self.num_kv_shared_layers or self.per_layer_input_size or self.has_linear_layers
                    or (self.num_experts and any(0 <= i < self.num_layers for i in self.dense_layers)))

    @property
    def has_linear_layers(self) -> bool:
        """Whether some layer is a Gated DeltaNet one (Qwen3.5's linear_attention)."""
        return self.layer_types is not None and "linear_attention" in self.layer_types

    def layer_groups(self) -> tuple[LayerGroup, ...]:
        """The layers as repeating patterns of equal LayerSpecs (Gemma 4's five sliding and one
        full layer), greedily from the first layer: at each start the pattern (period <= 16)
        covering the most layers with at least two repeats, else a single layer. Compile time
        then grows with the number of distinct groups, not with depth."""
        specs = self.layer_specs()
        groups, start, n = [], 0, self.num_layers
        while start < n:
            best = LayerGroup(start, 1, 1)
            for period in range(1, min(16, (n - start) // 2) + 1):
                pattern = specs[start:start + period]
                repeats = 1
                while (start + (repeats + 1) * period <= n
                       and specs[start + repeats * period:start + (repeats + 1) * period] == pattern):
                    repeats += 1
                if repeats >= 2 and period * repeats > best.period * best.repeats:
                    best = LayerGroup(start, period, repeats)
            groups.append(best)
            start += best.period * best.repeats
        return tuple(groups)

    def layer_config(self, spec: LayerSpec) -> "ModelConfig":
        """This config with one layer's shape (what its modules and adapters are built from)."""
        return self.replace(head_dim=spec.head_dim, num_kv_heads=spec.kv_heads, intermediate_size=spec.mlp_size)

    def parts(self) -> dict:
        """{field name: value}: what `jaxft.models.families` reads a family's keys and tensors from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_layers(self, n: int) -> "ModelConfig":
        """The first `n` layers of this architecture (their layer_types with them, repeated
        cyclically past the end): a shallower body of the same family for benches and tests."""
        types = self.layer_types
        return self.replace(num_layers=n, layer_types=None if types is None else
                            tuple(types[i % len(types)] for i in range(n)))

    def num_params(self, *, active: bool = False) -> int:
        """Parameter count (embeddings included), for memory estimates; `active`: those one
        token uses (an MoE layer's router, its k routed experts and the shared one), for FLOPs."""
        E = self.hidden_size
        heads = self.vocab_size * E * (1 if self.tie_word_embeddings else 2)
        specs = self.layer_specs()
        if specs is None:
            return self.num_layers * self._layer_params(self.dim_per_head, self.num_kv_heads, 2,
                                                        self.intermediate_size, self.num_experts > 0, active) + heads + E
        total = heads + E
        for spec in specs:
            kv_projections = 0 if spec.kv_from is not None else (1 if spec.values_from_keys else 2)
            total += self._layer_params(spec.head_dim, spec.kv_heads, kv_projections, spec.mlp_size, spec.moe, active)
            if spec.linear:  # the Gated DeltaNet mixer instead of attention (and its q / k norms)
                total += self._linear_params() - self._layer_params(spec.head_dim, spec.kv_heads, kv_projections, 0)
        if self.per_layer_input_size:
            P, N = self.per_layer_input_size, self.num_layers
            total += (self.per_layer_vocab_size or self.vocab_size) * N * P + E * N * P + P + N * (2 * E * P + E)
        return total

    def _layer_params(self, D: int, K: int, kv_projections: int, F: int, moe: bool = False,
                      active: bool = False) -> int:
        E, H = self.hidden_size, self.num_heads
        attn = E * D * ((3 if self.attn_output_gate else 2) * H + kv_projections * K)
        if self.qkv_bias:
            attn += D * (H + kv_projections * K)
        if self.attention_sinks:  # gpt-oss: its o_proj bias and sinks
            attn += E * self.o_bias + H
        if self.kv_lora_rank is not None:
            attn = self._mla_params()
        mlp = 3 * E * F
        if moe:  # router (and its selection bias), routed experts, the shared expert and its gate
            S = self.shared_expert_size
            experts = self.experts_per_token if active else self.num_experts
            mlp = (E * self.num_experts + 3 * E * self.expert_size * experts + 3 * E * S
                   + (E if self.shared_expert_gate else 0) + (self.num_experts if self.router_bias else 0)
                   + (self.num_experts if self.router_logit_bias else 0)
                   + ((2 * self.expert_size + E) * experts if self.expert_bias else 0))
        return attn + mlp + (4 if self.sandwich_norms else 2) * E + (2 * D if self.qk_norm else 0)

    def _linear_params(self) -> int:
        """One Gated DeltaNet mixer's params (jaxft.models.linear_attention) plus the layer's two norms."""
        E, Hk, Dk = self.hidden_size, self.linear_num_key_heads, self.linear_key_head_dim
        Hv, Dv = self.linear_num_value_heads, self.linear_value_head_dim
        C = 2 * Hk * Dk + Hv * Dv
        return E * (C + 2 * Hv * Dv + 2 * Hv) + self.linear_conv_kernel * C + 2 * Hv + Dv + 2 * E

    def _mla_params(self) -> int:
        """One multi-head latent attention's params: queries (direct or low-rank with its norm),
        the latent projection and norm, the latent's expansion, the output projection."""
        E, H, R, Q = self.hidden_size, self.num_heads, self.kv_lora_rank, self.q_lora_rank
        Dqk, Dv = self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        q = E * Q + Q + Q * H * Dqk if Q else E * H * Dqk
        return q + E * (R + self.qk_rope_head_dim) + R + R * H * (self.qk_nope_head_dim + Dv) + H * Dv * E


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


# --- HF config.json <-> ModelConfig (each family's rules: jaxft.models.families) ----------------


def config_from_hf(hf: dict, *, source: str = "config.json", dtype=None) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json` (4.x or 5.x dialect)."""
    parts, extra = families.parts_from_hf(hf, source=source)
    text = hf.get("text_config") if hf.get("model_type") in families.MULTIMODAL else None
    checkpoint_dtype = ((text or {}).get("dtype") or hf.get("dtype") or (text or {}).get("torch_dtype")
                        or hf.get("torch_dtype") or "float32")
    param_dtype = parse_dtype(dtype or checkpoint_dtype, key=f"{source} dtype")
    return ModelConfig(**parts, param_dtype=param_dtype, compute_dtype=param_dtype, extra_hf_config=extra)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict for `cfg`, readable by transformers 4.x and 5.x."""
    hf = dict(cfg.extra_hf_config)
    hf.update(families.parts_to_hf(cfg.parts()))
    hf["torch_dtype"] = dtype_name(cfg.param_dtype)
    return hf


def read_hf_config(folder: str | Path, *, dtype=None) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PathError(
            f"{path} not found: model.path must be a Hugging Face model folder with a config.json"
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}): a truncated or damaged file? re-export or "
                         "re-download the model") from None
    if not isinstance(hf, dict):
        raise DataError(f"{path}: not a JSON object: not a Hugging Face model config")
    return config_from_hf(hf, source=str(path), dtype=dtype)
