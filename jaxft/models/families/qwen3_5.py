"""Qwen3.5's family rows (dense and MoE text models): Gated DeltaNet layers (`linear_attention`
in layer_types) interleaved with gated full-attention layers, (1 + w) RMSNorms, partial rotary,
and for the MoE model Qwen2-MoE's routed experts with a sigmoid-gated shared expert. Their
config.json keys both ways and their tensor names (the registry: `jaxft.models.families`).

transformers' `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` save model_type `qwen3_5_text` /
`qwen3_5_moe_text`; the released checkpoints (`Qwen3_5ForConditionalGeneration`, model_type
`qwen3_5` / `qwen3_5_moe`) nest that config under text_config and are read as their text model
(`families.MULTIMODAL`). The multimodal RoPE's mrope_section is the plain RoPE for text (its
three position axes are equal), so it is not kept.
"""

from __future__ import annotations

from jaxft.models.families.base import Family, activation

_LINEAR_KEYS = {  # config.json key -> ModelConfig field
    "linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
    "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
    "linear_conv_kernel_dim": "linear_conv_kernel",
}
_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
             "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}  # transformers' Qwen3_5TextConfig


def _layer_types(hf: dict) -> tuple[str, ...]:
    """layer_types, or transformers' default: every full_attention_interval-th layer (4) full."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    every = int(hf.get("full_attention_interval") or 4)
    return tuple("linear_attention" if (i + 1) % every else "full_attention" for i in range(hf["num_hidden_layers"]))


def _parts(moe: bool):
    def parts(hf, source):
        activation(hf, source, {"silu": "silu"})
        bias = bool(hf.get("attention_bias", False))
        out = dict(norm="rms_plus_one", qk_norm=True, attn_output_gate=True, qkv_bias=bias, o_bias=bias,
                   layer_types=_layer_types(hf), head_dim=hf.get("head_dim", 256),
                   **{ours: int(hf.get(key, _DEFAULTS[key])) for key, ours in _LINEAR_KEYS.items()})
        if moe:  # every layer's MLP: routed experts (renormalised top k) and a gated shared expert
            out.update(num_experts=int(hf.get("num_experts") or 256), experts_per_token=int(hf.get("num_experts_per_tok") or 8),
                       moe_intermediate_size=int(hf.get("moe_intermediate_size") or 512), norm_topk_prob=True,
                       shared_expert_size=int(hf.get("shared_expert_intermediate_size") or 512),
                       shared_expert_gate=True)
        return out
    return parts


def _keys(moe: bool):
    def keys(p):
        hf = dict(attention_bias=p["qkv_bias"], layer_types=list(p["layer_types"]),
                  **{key: p[ours] for key, ours in _LINEAR_KEYS.items()})
        if moe:
            hf.update(num_experts=p["num_experts"], num_experts_per_tok=p["experts_per_token"],
                      moe_intermediate_size=p["moe_intermediate_size"] or p["intermediate_size"],
                      shared_expert_intermediate_size=p["shared_expert_size"])
        return hf
    return keys


_KEYS = frozenset({"attention_bias", "layer_types", "full_attention_interval", *_LINEAR_KEYS})
_MOE_KEYS = frozenset({"num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"})

FAMILIES = {
    "qwen3_5_text": Family("Qwen3_5ForCausalLM", _parts(False), _keys(False), _KEYS),
    "qwen3_5_moe_text": Family("Qwen3_5MoeForCausalLM", _parts(True), _keys(True), _KEYS | _MOE_KEYS,
                               experts=("mlp", "gate", "experts", "gate_proj", "up_proj", "down_proj")),
}
