"""gpt-oss's family row: its config.json keys both ways (MXFP4 checkpoints: `jaxft.models.mxfp4`)
and its tensor names, stacked experts with gate and up interleaved (the registry:
`jaxft.models.families`)."""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.families.base import Family, activation


def _gpt_oss(hf, source):
    """gpt-oss: attention with biases and sinks on alternating sliding (128) / full layers, YaRN
    RoPE (transformers' default when the config gives none), every layer's MLP routed experts
    with biases and the clamped SwiGLU, the router a Linear with a bias. Checkpoints quantized
    to MXFP4 (the released ones) are dequantized on load (`jaxft.models.mxfp4`), so the
    quantization_config is read here and not written back."""
    activation(hf, source, {"silu": "silu"})
    quant = hf.get("quantization_config")
    if quant and quant.get("quant_method") != "mxfp4":
        raise ConfigError(f"{source}: quantization_config quant_method={quant.get('quant_method')!r} is not "
                          "supported for gpt_oss (jaxft reads MXFP4 checkpoints, dequantized on load, and unquantized ones)")
    bias = bool(hf.get("attention_bias", True))
    n = hf["num_hidden_layers"]
    out = dict(
        norm="rms_f32", qkv_bias=bias, o_bias=bias, attention_sinks=True, activation="clamped_swiglu",
        sliding_window=hf.get("sliding_window", 128),
        layer_types=tuple(hf.get("layer_types") or ("full_attention" if i % 2 else "sliding_attention" for i in range(n))),
        num_experts=int(hf.get("num_local_experts") or hf.get("num_experts") or 128),
        experts_per_token=int(hf.get("num_experts_per_tok") or hf.get("experts_per_token") or 4),
        norm_topk_prob=True, router_logit_bias=True, expert_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        head_dim=hf.get("head_dim", 64))
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):  # transformers' default
        out.update(rope_theta=float(hf.get("rope_theta", 150000.0)), rope_scaling=dict(_GPT_OSS_YARN))
    return out


_GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _gpt_oss_keys(p):
    return dict(hidden_act="silu", attention_bias=p["qkv_bias"], sliding_window=p["sliding_window"],
                layer_types=list(p["layer_types"]), num_local_experts=p["num_experts"],
                num_experts_per_tok=p["experts_per_token"], swiglu_limit=p["swiglu_limit"],
                swiglu_alpha=p["swiglu_alpha"])


FAMILY = Family("GptOssForCausalLM", _gpt_oss, _gpt_oss_keys, frozenset({
    "attention_bias", "sliding_window", "layer_types", "num_local_experts", "num_experts", "num_experts_per_tok",
    "swiglu_limit", "swiglu_alpha", "quantization_config"}),
    experts=("mlp", "router", "experts", "gate_proj", "up_proj", "down_proj"), stacked_experts=True,
    interleaved=(("mlp.experts.gate_up_proj", ("mlp.experts.gate_proj", "mlp.experts.up_proj")),
                 ("mlp.experts.gate_up_proj_bias", ("mlp.experts.gate_proj_bias", "mlp.experts.up_proj_bias"))))
