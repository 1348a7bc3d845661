"""ModelConfig: the architecture of one decoder, read from and written to HF `config.json`.

One dataclass covers the Llama 2/3, Mistral, Qwen2/2.5 and Qwen3 families; the differences
between them are flags (biases, q/k norm, tied embeddings, sliding window, RoPE scaling).
Both `config.json` dialects are read: transformers 4.x (`rope_theta`, `rope_scaling`,
`torch_dtype` at top level) and 5.x (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxft.errors import ConfigError, DataError, PathError
from jaxft.models.lora import LoRASpec
from jaxft.models.remat import normalize_remat

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

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
    sliding_window: int | None = None  # Mistral v0.1: attend to the last W keys only
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: str = "none"  # what layers recompute in the backward pass (jaxft.models.remat)
    scan_layers: bool = True  # layers stacked and scanned: compile time independent of depth
    attention: str = "auto"  # attention backend (jaxft.models.attention.BACKENDS, or "auto")
    lora: LoRASpec | None = None  # adapters on the projections (jaxft.models.lora); None = none
    # Keys of the source config.json we do not model, written back unchanged on save.
    extra_hf_config: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "remat", normalize_remat(self.remat))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; jaxft supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported; jaxft supports "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included), for FLOP and memory estimates."""
        E, F, D = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = E * D * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += D * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * E * F + 2 * E + (2 * D if self.qk_norm else 0)
        heads = self.vocab_size * E * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + heads + E


# --- HF config.json <-> ModelConfig -------------------------------------------------------

_MODELLED_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "bos_token_id",
    "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "hidden_act", "architectures",
    "transformers_version",
}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config dialect."""
    params = hf.get("rope_parameters")
    if params:  # transformers 5.x: theta and scaling live together
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # very old spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def config_from_hf(hf: dict, *, source: str = "config.json", dtype=None) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json` (4.x or 5.x dialect)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; jaxft supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    sliding = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding = None  # Qwen configs carry a window size but switch it off with this flag
    # Only Llama and Qwen3 read `attention_bias` (q/k/v/o); Qwen2 always biases q/k/v.
    attention_bias = model_type in ("llama", "qwen3") and bool(hf.get("attention_bias", False))
    checkpoint_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    param_dtype = parse_dtype(dtype or checkpoint_dtype, key=f"{source} dtype")
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=param_dtype,
        compute_dtype=param_dtype,
        extra_hf_config={k: v for k, v in hf.items() if k not in _MODELLED_KEYS},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` dict for `cfg`, readable by transformers 4.x and 5.x."""
    hf = dict(cfg.extra_hf_config)
    hf.update(
        architectures=[_ARCHITECTURES[cfg.model_type]],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_per_head,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        # 4.x keys: transformers 5 still reads them, 4.x reads nothing else.
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        torch_dtype=dtype_name(cfg.param_dtype),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.o_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral" or cfg.sliding_window:
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
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
