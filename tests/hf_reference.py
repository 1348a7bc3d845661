"""Tiny random transformers (PyTorch, fp32) models of every supported family, for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0, rms_norm_eps=1e-5)),
    "llama3_rope": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "llama_bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(rope_theta=1e6, sliding_window=5, head_dim=24)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(rope_theta=1e6, rms_norm_eps=1e-6, head_dim=32,
                                             tie_word_embeddings=False)),
    # Gemma 2: sandwich norms, GeGLU, scaled embeddings, both soft-caps, query_pre_attn_scalar,
    # sliding (window 5 < the 16-token rows) and global layers alternating; 3 layers (odd).
    "gemma2": (transformers.Gemma2Config, dict(
        num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6)),
    # Gemma 3: the 5:1 pattern over 8 layers (one full group and 2 more), QK-norm, local layers
    # on their own RoPE theta, the global ones linearly scaled.
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=8, head_dim=16, sliding_window=5, query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
    # Gemma 4 (dense, E2B-like parts): full layers with their own head dim (32 vs 16) and one kv
    # head whose values are its keys, per-layer input embeddings, the last 3 layers reading the
    # keys and values of the last sliding / full layer before them with double-wide MLPs,
    # proportional RoPE on full layers, random layer scalars. 12 layers: a (sliding, sliding,
    # full) pattern scanned twice, then layers of their own.
    "gemma4_text": (transformers.Gemma4TextConfig, dict(
        num_hidden_layers=12, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, num_kv_shared_layers=3, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=97, use_double_wide_mlp=True, sliding_window=5,
        final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 4)),
    # Mixture of experts: 4 experts, top 2, 16-token rows (32 token-expert pairs over 4 experts).
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6)),
    # Qwen2-MoE: a shared expert behind a sigmoid gate, top-k not renormalised, q/k/v biases, and
    # layer 1 dense (mlp_only_layers) over 3 layers.
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, norm_topk_prob=False, mlp_only_layers=[1])),
    # Qwen3-MoE: QK-norm, renormalised top-k, every layer sparse.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True, head_dim=32)),
    # DeepSeek-V2-Lite's parts: multi-head latent attention with direct queries (q_lora_rank None),
    # interleaved RoPE dims under YaRN (mscale_all_dim: the softmax scale too), softmax routing
    # limited to the best 2 of 4 expert groups, 2 shared experts, layer 0 dense.
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        moe_intermediate_size=24, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                       "mscale": 0.707, "mscale_all_dim": 0.707})),
    # DeepSeek-V3's parts: low-rank queries, sigmoid routing with a (randomised) selection bias
    # within the best 2 of 4 groups, renormalised weights times 2.5, layer 0 dense.
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=24, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True)),
    # gpt-oss: sliding (window 5 < the 16-token rows) and full layers alternating, attention
    # biases and (randomised) sinks, YaRN untruncated, a router with a bias, experts with biases
    # and the clamped SwiGLU (limit 1.0 here, so the clamps bind), weights large enough that a
    # misplaced gate / up column shows.
    "gpt_oss": (transformers.GptOssConfig, dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=5, swiglu_limit=1.0, rms_norm_eps=1e-5, max_position_embeddings=32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 8})),
    # Phi-3: fused qkv_proj / gate_up_proj, a window on every layer.
    "phi3": (transformers.Phi3Config, dict(sliding_window=7, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Phi-3.5 / Phi-4-mini style: partial rotary (3/4 of each head) and LongRoPE.
    "phi3_longrope": (transformers.Phi3Config, dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
        original_max_position_embeddings=12,  # the 16-token rows take the long factors
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0 + 0.1 * i for i in range(6)],
                         "long_factor": [2.0 + 0.5 * i for i in range(6)]})),
}


def make_hf_model(family: str, seed: int = 0):
    """A random fp32 transformers CausalLM of `family`; norms and biases are randomised too,
    so a parity test also catches a missing or misplaced norm weight or bias."""
    config_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's norms store an offset from 1: random too
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("_proj_bias"):  # gpt-oss's experts: *_proj_bias
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(".sinks"):  # gpt-oss: large enough to change each softmax
                p.copy_(torch.randn_like(p))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(0.2 * torch.randn_like(p))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4: a stored constant per layer
                buffer.copy_(1.0 + 0.1 * torch.randn_like(buffer))
            elif name.endswith("e_score_correction_bias"):  # DeepSeek-V3: it changes which experts win
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.from_numpy(np.asarray(positions, np.int64))
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs)
    return out.logits.float().numpy()
