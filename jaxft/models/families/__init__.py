"""The model families jaxft loads: each a row mapping an HF `config.json` to decoder parts
(`jaxft.models.config.ModelConfig` fields) and back, plus how its tensors are named.

A row is a `Family`: the transformers architecture it saves as, the config keys it reads
beyond the common ones (`parts(hf) -> ModelConfig kwargs`, `hf_keys(parts) -> config.json
keys`), and its fused tensors (Phi-3's `qkv_proj` and `gate_up_proj`, split on load, fused on
save). Adding a family is a row here when its layers are made of existing parts; the larger
rows live in modules of their own beside this one (`deepseek`, `gpt_oss`, `qwen3_5`), and `FAMILIES` here
stays the one registry.
"""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.families import deepseek, gpt_oss, qwen3_5
from jaxft.models.families.base import Family, activation

# Keys every family reads (the rest of a config.json is kept and written back unchanged).
_COMMON_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "hidden_act",
    "architectures", "transformers_version", "partial_rotary_factor",
}


def _llama(hf, source):
    activation(hf, source, {"silu": "silu"})
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _mistral(hf, source):
    activation(hf, source, {"silu": "silu"})
    return dict(sliding_window=hf.get("sliding_window"))


def _qwen(qk_norm: bool):
    def parts(hf, source):
        activation(hf, source, {"silu": "silu"})
        # Qwen configs carry a window size but switch it off with use_sliding_window.
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        if not qk_norm:  # Qwen2 always biases q / k / v, never o
            return dict(qkv_bias=True, sliding_window=sliding)
        bias = bool(hf.get("attention_bias", False))
        return dict(qk_norm=True, qkv_bias=bias, o_bias=bias, sliding_window=sliding)
    return parts


def _default_layer_types(hf: dict, every: int) -> list[str]:
    """transformers' default when a Gemma config.json has no layer_types: every `every`-th
    layer full, the others sliding."""
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(hf["num_hidden_layers"])]


def _gemma(version: int):
    def parts(hf, source):
        every = 2 if version == 2 else int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        out = dict(
            norm="rms_plus_one", sandwich_norms=True, embed_scale=True,
            activation=activation(hf, source, {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            sliding_window=hf.get("sliding_window"),
            layer_types=tuple(hf.get("layer_types") or _default_layer_types(hf, every)),
            qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        )
        if version == 3:
            out["qk_norm"] = True
            local = _rope_of(hf, "sliding_attention")
            if local is not None:
                out["local_rope_theta"], out["local_rope_scaling"] = local
            elif hf.get("rope_local_base_freq") is not None:  # the 4.x spelling
                out["local_rope_theta"] = float(hf["rope_local_base_freq"])
        return out
    return parts


def _gemma_keys(version: int):
    def keys(p):
        hf = dict(
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=p["query_pre_attn_scalar"],
            attn_logit_softcapping=p["attn_logit_softcap"], final_logit_softcapping=p["final_logit_softcap"],
            sliding_window=p["sliding_window"], layer_types=list(p["layer_types"]),
            attention_bias=p["qkv_bias"],
        )
        if version == 3:
            hf["rope_local_base_freq"] = p["local_rope_theta"] if p["local_rope_theta"] is not None else p["rope_theta"]
        return hf
    return keys


_DROP = object()  # a family's hf_keys value: leave the common key out of its config.json


def _gemma4(hf, source):
    """Gemma 4's text decoder: Gemma 3's parts, with full layers of their own head dim (and, when
    values equal keys, kv heads), proportional RoPE on the full layers, values RMS-normed, a
    scalar per layer, per-layer input embeddings and KV sharing where the config sets them."""
    if hf.get("enable_moe_block"):
        raise ConfigError(f"{source}: Gemma 4 with enable_moe_block=true (a mixture-of-experts model) is not "
                          "supported yet; the dense Gemma 4 models load")
    if hf.get("use_bidirectional_attention") not in (None, "vision"):
        raise ConfigError(f"{source}: use_bidirectional_attention={hf['use_bidirectional_attention']!r}: jaxft "
                          "trains causal decoders only")
    types = list(hf.get("layer_types") or _default_layer_types(hf, 6))
    types[-1] = "full_attention"  # transformers forces the last layer full
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    global_dim, global_kv = hf.get("global_head_dim", 512), hf.get("num_global_key_value_heads") if k_eq_v else None
    if hf.get("per_layer_config") is not None:  # as transformers 5.x saves it: per full layer ({}: none)
        overrides = {int(k): v for k, v in hf["per_layer_config"].items()}
        full = {i for i, t in enumerate(types) if t == "full_attention"}
        distinct = {tuple(sorted(v.items())) for v in overrides.values()}
        first = overrides.get(min(full), {}) if full else {}
        if (overrides and set(overrides) != full) or len(distinct) > 1 or set(first) - {"head_dim", "num_key_value_heads"}:
            raise ConfigError(f"{source}: per_layer_config must give the full-attention layers {sorted(full)} one "
                              f"head_dim (and num_key_value_heads); got {hf['per_layer_config']}")
        global_dim, global_kv = first.get("head_dim"), first.get("num_key_value_heads")
    rope = (hf.get("rope_parameters") or {}).get("full_attention") or {"rope_type": "proportional",
                                                                       "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    local = _rope_of(hf, "sliding_attention")
    out = dict(
        norm="rms_f32", sandwich_norms=True, embed_scale=True, qk_norm=True, v_norm=True, layer_scalar=True,
        activation=activation(hf, source, {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}),
        final_logit_softcap=hf.get("final_logit_softcapping"), query_pre_attn_scalar=1.0,
        sliding_window=hf.get("sliding_window"), layer_types=tuple(types),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        rope_theta=float(rope.get("rope_theta", 1e6)),
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} or None,
        global_head_dim=global_dim, global_kv_heads=global_kv, attention_k_eq_v=k_eq_v,
        per_layer_input_size=int(hf.get("hidden_size_per_layer_input") or 0),
        per_layer_vocab_size=hf.get("vocab_size_per_layer_input"),
        num_kv_shared_layers=int(hf.get("num_kv_shared_layers") or 0),
        double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
    )
    if out["rope_scaling"] and out["rope_scaling"].get("rope_type", "default") == "default":
        out["rope_scaling"] = None
    if local is not None:
        out["local_rope_theta"], out["local_rope_scaling"] = local
    return out


def _gemma4_keys(p):
    rope = {"rope_type": "default", "rope_theta": p["rope_theta"], **(p["rope_scaling"] or {})}
    local = {"rope_type": "default", "rope_theta": p["local_rope_theta"] or p["rope_theta"],
             **(p["local_rope_scaling"] or {})}
    hf = dict(
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=p["final_logit_softcap"],
        sliding_window=p["sliding_window"], layer_types=list(p["layer_types"]), attention_bias=p["qkv_bias"],
        rope_parameters={"sliding_attention": local, "full_attention": rope}, rope_theta=_DROP, rope_scaling=_DROP,
        global_head_dim=p["global_head_dim"] or p["head_dim"], attention_k_eq_v=p["attention_k_eq_v"],
        hidden_size_per_layer_input=p["per_layer_input_size"],
        vocab_size_per_layer_input=p["per_layer_vocab_size"] or p["vocab_size"],
        num_kv_shared_layers=p["num_kv_shared_layers"], use_double_wide_mlp=p["double_wide_mlp"],
        enable_moe_block=False,
    )
    if p["global_kv_heads"] is not None:
        hf["num_global_key_value_heads"] = p["global_kv_heads"]
    return hf


def _moe_layers(hf: dict) -> tuple[int, ...]:
    """Qwen-MoE's dense layers: those in mlp_only_layers, and all but every decoder_sparse_step-th."""
    step, only = int(hf.get("decoder_sparse_step") or 1), set(hf.get("mlp_only_layers") or ())
    return tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step)


def _mixtral(hf, source):
    activation(hf, source, {"silu": "silu"})
    return dict(sliding_window=hf.get("sliding_window"), num_experts=int(hf.get("num_local_experts", 8)),
                experts_per_token=int(hf.get("num_experts_per_tok", 2)), norm_topk_prob=True)


def _qwen_moe(qk_norm: bool):
    dense = _qwen(qk_norm)

    def parts(hf, source):
        out = dense(hf, source)
        # transformers 5.x saves Qwen3-MoE's count as num_local_experts, the hub's configs as num_experts
        out.update(num_experts=int(hf.get("num_experts") or hf.get("num_local_experts") or (60 if not qk_norm else 128)),
                   experts_per_token=int(hf.get("num_experts_per_tok", 4 if not qk_norm else 8)),
                   moe_intermediate_size=hf.get("moe_intermediate_size"),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=_moe_layers(hf))
        if not qk_norm:  # Qwen2-MoE: a shared expert behind a sigmoid gate
            out.update(shared_expert_size=int(hf.get("shared_expert_intermediate_size") or 0),
                       shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")))
        return out
    return parts


def _qwen_moe_keys(qk_norm: bool, dense_keys):
    def keys(p):
        hf = dict(dense_keys(p), num_experts=p["num_experts"], num_experts_per_tok=p["experts_per_token"],
                  moe_intermediate_size=p["moe_intermediate_size"] or p["intermediate_size"],
                  norm_topk_prob=p["norm_topk_prob"], decoder_sparse_step=1, mlp_only_layers=list(p["dense_layers"]))
        if not qk_norm:
            hf["shared_expert_intermediate_size"] = p["shared_expert_size"]
        return hf
    return keys


_MOE_KEYS = frozenset({"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                       "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size"})


def _phi3(hf, source):
    activation(hf, source, {"silu": "silu"})
    return dict(sliding_window=hf.get("sliding_window"))


def _phi3_keys(p):
    hf = dict(sliding_window=p["sliding_window"])
    scaling = p["rope_scaling"]
    if scaling and scaling.get("rope_type") == "longrope":  # its original length stays top-level
        hf["rope_scaling"] = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    return hf


def _phi3_fused(p):
    H, K, F = p["num_heads"], p["num_kv_heads"], p["intermediate_size"]
    D = p["head_dim"] or p["hidden_size"] // H
    return {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", H * D), ("self_attn.k_proj.weight", K * D),
                                          ("self_attn.v_proj.weight", K * D)),
            "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", F), ("mlp.up_proj.weight", F))}


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", _llama,
                    lambda p: dict(attention_bias=p["o_bias"], mlp_bias=p["mlp_bias"]),
                    frozenset({"attention_bias", "mlp_bias"})),
    "mistral": Family("MistralForCausalLM", _mistral, lambda p: dict(sliding_window=p["sliding_window"]),
                      frozenset({"sliding_window"})),
    "qwen2": Family("Qwen2ForCausalLM", _qwen(qk_norm=False),
                    lambda p: dict(use_sliding_window=p["sliding_window"] is not None,
                                   **({"sliding_window": p["sliding_window"]} if p["sliding_window"] else {})),
                    frozenset({"sliding_window", "use_sliding_window", "attention_bias"}), tie_default=True),
    "qwen3": Family("Qwen3ForCausalLM", _qwen(qk_norm=True),
                    lambda p: dict(attention_bias=p["o_bias"], use_sliding_window=p["sliding_window"] is not None,
                                   **({"sliding_window": p["sliding_window"]} if p["sliding_window"] else {})),
                    frozenset({"sliding_window", "use_sliding_window", "attention_bias"})),
    "gemma2": Family("Gemma2ForCausalLM", _gemma(2), _gemma_keys(2), frozenset({
        "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
        "sliding_window", "layer_types", "attention_bias"}), tie_default=True),
    "gemma3_text": Family("Gemma3ForCausalLM", _gemma(3), _gemma_keys(3), frozenset({
        "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
        "sliding_window", "layer_types", "attention_bias", "rope_local_base_freq", "sliding_window_pattern",
        "_sliding_window_pattern"}), tie_default=True),
    "gemma4_text": Family("Gemma4ForCausalLM", _gemma4, _gemma4_keys, frozenset({
        "hidden_activation", "final_logit_softcapping", "sliding_window", "layer_types", "attention_bias",
        "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "hidden_size_per_layer_input",
        "vocab_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp", "enable_moe_block",
        "per_layer_config", "use_bidirectional_attention", "num_experts", "top_k_experts",
        "moe_intermediate_size"}), tie_default=True),
    "mixtral": Family("MixtralForCausalLM", _mixtral,
                      lambda p: dict(sliding_window=p["sliding_window"], num_local_experts=p["num_experts"],
                                     num_experts_per_tok=p["experts_per_token"]),
                      frozenset({"sliding_window", "num_local_experts", "num_experts_per_tok"}),
                      experts=("block_sparse_moe", "gate", "experts", "w1", "w3", "w2")),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", _qwen_moe(qk_norm=False),
                        _qwen_moe_keys(False, lambda p: dict(
                            use_sliding_window=p["sliding_window"] is not None,
                            **({"sliding_window": p["sliding_window"]} if p["sliding_window"] else {}))),
                        frozenset({"sliding_window", "use_sliding_window", "attention_bias"}) | _MOE_KEYS,
                        experts=("mlp", "gate", "experts", "gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", _qwen_moe(qk_norm=True),
                        _qwen_moe_keys(True, lambda p: dict(
                            attention_bias=p["o_bias"], use_sliding_window=p["sliding_window"] is not None,
                            **({"sliding_window": p["sliding_window"]} if p["sliding_window"] else {}))),
                        frozenset({"sliding_window", "use_sliding_window", "attention_bias"}) | _MOE_KEYS,
                        experts=("mlp", "gate", "experts", "gate_proj", "up_proj", "down_proj")),
    **deepseek.FAMILIES,
    "phi3": Family("Phi3ForCausalLM", _phi3, _phi3_keys, frozenset({"sliding_window"}), fused=_phi3_fused),
    "gpt_oss": gpt_oss.FAMILY,
    **qwen3_5.FAMILIES,
}


# Multimodal checkpoints whose text decoder jaxft trains: {model_type: the text config's type}.
# Their text tensors sit under a prefix (`wrapped_name`); the vision tower and projector are
# not loaded, and an export is the text model (e.g. Gemma3ForCausalLM), which transformers loads.
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen3_5": "qwen3_5_text",
              "qwen3_5_moe": "qwen3_5_moe_text"}
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_TEXT_HEADS = ("language_model.lm_head.weight",)
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
             "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "model.visual.", "mtp.")


def text_tensor_names(names) -> tuple[dict[str, str], set[str]]:
    """({checkpoint-style text name: stored name}, stored names that are not the text model)
    for the tensors of a multimodal checkpoint; ({}, set()) for a text-only one."""
    if not any(n.startswith(_TEXT_PREFIXES) for n in names):
        return {}, set()
    renamed, other = {}, set()
    for name in names:
        prefix = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            renamed["model." + name[len(prefix):]] = name
        elif name in _TEXT_HEADS:
            renamed["lm_head.weight"] = name
        elif name.startswith(_NOT_TEXT):
            other.add(name)
        else:  # kept under its own name: the loader names it as unexpected
            renamed[name] = name
    return renamed, other


def _text_config(hf: dict) -> dict:
    """A multimodal config.json's text part as a config.json of its own (dtype and tying
    inherited from the outer config where the text part does not say)."""
    text = dict(hf.get("text_config") or {})
    text["model_type"] = MULTIMODAL[hf["model_type"]]
    for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
        if key not in text and key in hf:
            text[key] = hf[key]
    return text


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported; jaxft supports "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _rope_of(hf: dict, layer_type: str | None) -> tuple[float, dict | None] | None:
    """(theta, scaling) from either dialect; for a layer type of a 5.x per-type rope_parameters
    (Gemma 3), that type's, or None when the config has no per-type entry for it."""
    params = hf.get("rope_parameters")
    if params and layer_type is not None:
        if not isinstance(params.get(layer_type), dict):
            return None
        params = params[layer_type]
    elif params and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    if params:  # transformers 5.x: theta and scaling live together
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    elif layer_type is not None:
        return None
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # very old spelling
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type") == "longrope" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def _partial_rotary(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)


def parts_from_hf(hf: dict, *, source: str = "config.json") -> tuple[dict, dict]:
    """(ModelConfig kwargs, the config.json keys jaxft does not model) of a parsed config.json."""
    if hf.get("model_type") in MULTIMODAL:
        hf = _text_config(hf)
    model_type = hf.get("model_type")
    fam = family(model_type) if model_type in FAMILIES else None
    if fam is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; jaxft supports "
                          f"{', '.join(FAMILIES)} (and the text model of {', '.join(MULTIMODAL)})")
    theta, scaling = _rope_of(hf, None)
    heads = hf["num_attention_heads"]
    parts = dict(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        # an MoE config may have no dense width (Qwen3.5-MoE): its experts' then
        intermediate_size=hf.get("intermediate_size") or hf["moe_intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        partial_rotary_factor=_partial_rotary(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_default)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    parts.update(fam.parts(hf, source))
    extra = {k: v for k, v in hf.items() if k not in _COMMON_KEYS | fam.keys}
    return parts, extra


def parts_to_hf(p: dict) -> dict:
    """The config.json keys of ModelConfig fields `p` (4.x spelling, which 5.x still reads)."""
    fam = family(p["model_type"])
    hf = dict(
        architectures=[fam.architecture], model_type=p["model_type"], vocab_size=p["vocab_size"],
        hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
        num_key_value_heads=p["num_kv_heads"], head_dim=p["head_dim"] or p["hidden_size"] // p["num_heads"],
        rms_norm_eps=p["rms_norm_eps"], rope_theta=p["rope_theta"],
        rope_scaling=dict(p["rope_scaling"]) if p["rope_scaling"] else None,
        max_position_embeddings=p["max_position_embeddings"], tie_word_embeddings=p["tie_word_embeddings"],
        bos_token_id=p["bos_token_id"], eos_token_id=p["eos_token_id"], pad_token_id=p["pad_token_id"],
    )
    if p["activation"] == "silu":
        hf["hidden_act"] = "silu"
    if p["partial_rotary_factor"] != 1.0:
        hf["partial_rotary_factor"] = p["partial_rotary_factor"]
    hf.update(fam.hf_keys(p))
    return {k: v for k, v in hf.items() if v is not _DROP}


def fused_tensors(model_type: str, p: dict) -> dict:
    """{fused suffix: ((part suffix, rows), ...)} of a family (empty when nothing is fused)."""
    fam = family(model_type)
    return fam.fused(p) if fam.fused else {}
