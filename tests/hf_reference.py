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
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.from_numpy(np.asarray(positions, np.int64))
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs)
    return out.logits.float().numpy()
