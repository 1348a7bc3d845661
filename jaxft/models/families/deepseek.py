"""DeepSeek-V2 / V3's family rows: multi-head latent attention and routed experts with shared
ones, their config.json keys both ways and their tensor names (the registry: `jaxft.models.families`)."""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.families.base import Family, activation


def _deepseek(version: int):
    """DeepSeek-V2 / V3: multi-head latent attention, routed experts with shared ones, the first
    `first_k_dense_replace` layers (and, V2, all but every `moe_layer_freq`-th) dense. V2 routes
    by softmax, greedily or group-limited (`topk_method`); V3 by sigmoid scores plus a selection
    bias within the best `topk_group` of `n_group` groups."""
    def parts(hf, source):
        activation(hf, source, {"silu": "silu"})
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for {hf['model_type']}")
        scoring = hf.get("scoring_func") or ("softmax" if version == 2 else "sigmoid")
        if scoring != ("softmax" if version == 2 else "sigmoid"):
            raise ConfigError(f"{source}: scoring_func={scoring!r}: DeepSeek-V{version} routes by "
                              f"{'softmax' if version == 2 else 'sigmoid'} scores (as transformers does)")
        method = hf.get("topk_method") or ("greedy" if version == 2 else "noaux_tc")
        allowed = ("greedy", "group_limited_greedy") if version == 2 else ("noaux_tc",)
        if method not in allowed:
            raise ConfigError(f"{source}: topk_method={method!r} is not supported for DeepSeek-V{version} "
                              f"(supported: {', '.join(allowed)})")
        grouped = method != "greedy"
        first, freq, n = int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1), hf["num_hidden_layers"]
        experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
        return dict(
            kv_lora_rank=int(hf["kv_lora_rank"]), q_lora_rank=hf.get("q_lora_rank") or None,
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]), head_dim=int(hf["qk_rope_head_dim"]),
            num_kv_heads=hf["num_attention_heads"],  # MLA has no kv heads; every head reads the latent
            rope_interleave=True if version == 2 else bool(hf.get("rope_interleave", True)),
            num_experts=experts, experts_per_token=int(hf.get("num_experts_per_tok") or 1),
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", version == 3)),
            shared_expert_size=int(hf.get("moe_intermediate_size") or 0) * int(hf.get("n_shared_experts") or 0),
            dense_layers=tuple(i for i in range(n) if i < first or i % freq),
            router_scoring=scoring, router_groups=int(hf.get("n_group") or 1) if grouped else 1,
            router_topk_groups=int(hf.get("topk_group") or 1) if grouped else 1,
            router_bias=version == 3, routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            router_f32=True,
        )
    return parts


def _deepseek_keys(version: int):
    def keys(p):
        dense = set(p["dense_layers"])
        first = next((i for i in range(p["num_layers"]) if i not in dense), p["num_layers"])
        if dense != set(range(first)):
            raise ConfigError(f"dense_layers={sorted(dense)}: a DeepSeek config.json can only say the first k "
                              "layers are dense (first_k_dense_replace)")
        F = p["moe_intermediate_size"] or p["intermediate_size"]
        hf = dict(
            kv_lora_rank=p["kv_lora_rank"], q_lora_rank=p["q_lora_rank"], qk_nope_head_dim=p["qk_nope_head_dim"],
            qk_rope_head_dim=p["qk_rope_head_dim"], v_head_dim=p["v_head_dim"], head_dim=p["qk_rope_head_dim"],
            attention_bias=False, n_routed_experts=p["num_experts"], num_experts_per_tok=p["experts_per_token"],
            moe_intermediate_size=F, n_shared_experts=p["shared_expert_size"] // F,
            first_k_dense_replace=first, norm_topk_prob=p["norm_topk_prob"],
            n_group=p["router_groups"], topk_group=p["router_topk_groups"],
            routed_scaling_factor=p["routed_scaling_factor"], scoring_func=p["router_scoring"],
        )
        if version == 2:
            hf.update(moe_layer_freq=1,
                      topk_method="group_limited_greedy" if p["router_groups"] > 1 else "greedy")
        else:
            hf.update(topk_method="noaux_tc", rope_interleave=p["rope_interleave"])
        return hf
    return keys


_DEEPSEEK_KEYS = frozenset({
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "attention_bias",
    "n_routed_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
    "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "n_group", "topk_group", "topk_method",
    "routed_scaling_factor", "scoring_func", "rope_interleave", "qk_head_dim"})


_EXPERTS = ("mlp", "gate", "experts", "gate_proj", "up_proj", "down_proj")  # `Family.experts`

FAMILIES = {
    "deepseek_v2": Family("DeepseekV2ForCausalLM", _deepseek(2), _deepseek_keys(2), _DEEPSEEK_KEYS,
                          experts=_EXPERTS, shared_experts="shared_experts"),
    "deepseek_v3": Family("DeepseekV3ForCausalLM", _deepseek(3), _deepseek_keys(3), _DEEPSEEK_KEYS,
                          experts=_EXPERTS, shared_experts="shared_experts"),
}
