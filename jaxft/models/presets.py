"""Built-in architectures: `tiny` for tests and the quickstart, and real sizes for planning
and `jaxft bench` (`bench`, `moe_bench`, `qwen3_5_bench`, `smollm2_135m`, `llama3_vocab_2x64`).

Real-size presets describe the published checkpoints' architectures (from their config.json)
so `jaxft plan` / `jaxft bench` can size a run without downloading anything; fine-tuning a
real model starts from its HF folder (`model.path`), which carries the same config.
"""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.models.config import ModelConfig

_LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _every_nth_full(num_layers: int, n: int) -> tuple[str, ...]:
    """Gemma's layer_types: layer i is full attention when (i + 1) % n == 0, else sliding
    (transformers' rule: Gemma 2 alternates, n=2, from a sliding first layer; Gemma 3 is 5:1)."""
    return tuple("full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers))


# Gemma 2 / 3's parts (jaxft.models.families reads the same from their config.json): (1 + w)
# RMSNorms before and after attention and the MLP, GeGLU, embeddings times sqrt(hidden_size),
# the tied LM head. bos 2, eos 1, pad 0 as their config.json.
_GEMMA = dict(norm="rms_plus_one", sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
              rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
# Gemma 3's global layers: theta 1M with linear scaling x8 (the 128k context); its sliding
# layers theta 10k, unscaled (config.json's rope_local_base_freq).
_GEMMA3 = dict(_GEMMA, model_type="gemma3_text", qk_norm=True, sliding_window=1024, rope_theta=1_000_000.0,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, local_rope_theta=10_000.0,
               max_position_embeddings=131072, vocab_size=262208,
               eos_token_id=[1, 106])  # the -it models' config.json: <eos> and <end_of_turn>

# Qwen3.5's parts (jaxft.models.families.qwen3_5): (1 + w) RMSNorms, QK-norm, gated full attention
# every 4th layer, Gated DeltaNet layers (conv width 4, 128-dim heads) in between.
_QWEN3_5 = dict(norm="rms_plus_one", qk_norm=True, attn_output_gate=True, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel=4)


def _qwen3_5_layers(num_layers: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers))


PRESETS: dict[str, ModelConfig] = {
    # ~1M params: trains on 2 CPU cores in about a minute.
    "tiny": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
    ),
    # ~7M params, fp32: `jaxft bench`'s default comparison shape against PyTorch on a CPU (big
    # enough that matmuls, not dispatch, dominate; small enough for 2,048-token rows on 2 cores).
    "bench": ModelConfig(
        model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4,
        num_heads=8, num_kv_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    # The bench's mixture of experts: the `bench` shape with Mixtral's MLPs, 8 experts of width
    # 512, 2 per token (`jaxft bench --preset moe_bench --compare torch`).
    "moe_bench": ModelConfig(
        model_type="mixtral", vocab_size=8192, hidden_size=256, intermediate_size=512, num_layers=4,
        num_heads=8, num_kv_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        num_experts=8, experts_per_token=2,
    ),
    # The bench's Qwen3.5: the `bench` width with Qwen3.5's layers, 3 Gated DeltaNet (2 key / 4
    # value heads of 64) + 1 gated full attention (`jaxft bench --preset qwen3_5_bench --compare
    # torch`: against transformers' Qwen3_5ForCausalLM).
    "qwen3_5_bench": ModelConfig(
        model_type="qwen3_5_text", vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
        partial_rotary_factor=0.25, max_position_embeddings=4096,
        **(_QWEN3_5 | dict(linear_key_head_dim=64, linear_value_head_dim=64)),
        layer_types=_qwen3_5_layers(4), linear_num_key_heads=2, linear_num_value_heads=4,
    ),
    # HuggingFaceTB/SmolLM2-135M (134,515,008 params, tied embeddings): a real small model with a
    # real tokenizer's vocabulary (49,152), the shape a laptop or one small GPU fine-tunes.
    # bos = eos = 0 (<|endoftext|>) as its config.json; the -Instruct model's says 1 / 2.
    "smollm2_135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    ),
    # Llama 3's vocabulary (128,256, untied as Llama-3-8B) on a 2-layer, width-64 body: 16.5M
    # params of which 99% are the embedding and the LM head, so a step is the loss over a 128k
    # vocabulary and little else, the shape users found slow. The body keeps Llama 3's
    # proportions: MLP 3.5x the width (14,336 / 4,096) and 4 query heads per KV head (32 / 8).
    "llama3_vocab_2x64": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=64, intermediate_size=224, num_layers=2,
        num_heads=4, num_kv_heads=1, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=128009,
    ),
    "llama3_8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009,
    ),
    "llama3_70b": ModelConfig(  # Llama-3.1-70B (-Instruct)
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009,
    ),
    "mistral_7b": ModelConfig(  # Mistral-7B-v0.3
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2_5_7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        max_position_embeddings=32768, eos_token_id=151645,
    ),
    "qwen3_8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        max_position_embeddings=40960, eos_token_id=151645,
    ),
    # DeepSeek LLM (the recipe this project grew from): Llama-architecture checkpoints.
    "deepseek_llm_7b": ModelConfig(
        model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_layers=30,
        num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek_llm_67b": ModelConfig(
        model_type="llama", vocab_size=102400, hidden_size=8192, intermediate_size=22016, num_layers=95,
        num_heads=64, num_kv_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=100000, eos_token_id=100001,
    ),
    # google/gemma-2-9b (9,241,705,984 params): sliding (4,096) and full layers alternate from a
    # sliding first one; attention scores and output logits soft-capped at 50 and 30.
    "gemma2_9b": ModelConfig(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42,
        num_heads=16, num_kv_heads=8, head_dim=256, rope_theta=10000.0, max_position_embeddings=8192,
        sliding_window=4096, layer_types=_every_nth_full(42, 2), attn_logit_softcap=50.0,
        final_logit_softcap=30.0, query_pre_attn_scalar=256, **_GEMMA,
    ),
    # The text model of google/gemma-3-4b-it (its config.json's text_config; 3,880,263,168
    # params without the vision tower): 5 sliding (1,024) layers to 1 full, QK-norm, no soft-caps.
    "gemma3_4b": ModelConfig(
        hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
        layer_types=_every_nth_full(34, 6), query_pre_attn_scalar=256, **_GEMMA3,
    ),
    # google/gemma-3-270m (268M params, 168M of them the 262k-token embedding): the smallest
    # Gemma 3, the Gemma-shaped CPU bench (`jaxft bench --preset gemma3_270m --layers 6`).
    "gemma3_270m": ModelConfig(
        **{**_GEMMA3, "rope_scaling": None, "max_position_embeddings": 32768, "vocab_size": 262144,
           "sliding_window": 512},
        hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
        layer_types=_every_nth_full(18, 6), query_pre_attn_scalar=256,
    ),
    # The text model of google/gemma-3-27b-it (27,009,346,304 params without the vision tower).
    "gemma3_27b": ModelConfig(
        hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128,
        layer_types=_every_nth_full(62, 6), query_pre_attn_scalar=168, **_GEMMA3,
    ),
    # Qwen/Qwen3-30B-A3B: 128 routed experts of width 768 per layer, 8 per token, every layer
    # sparse, QK-norm.
    "qwen3_30b_a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        max_position_embeddings=40960, num_experts=128, experts_per_token=8, moe_intermediate_size=768,
        norm_topk_prob=True, bos_token_id=151643, eos_token_id=151645,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: multi-head latent attention (latent rank 512, direct
    # queries, 64 RoPE dims under YaRN x40 of a 4k original context), 64 routed experts of width
    # 1,408 (6 per token, softmax, greedy) plus 2 shared, layer 0 dense.
    "deepseek_v2_lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27,
        num_heads=16, num_kv_heads=16, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, num_experts=64, experts_per_token=6,
        moe_intermediate_size=1408, norm_topk_prob=False, shared_expert_size=2816, dense_layers=(0,),
        router_f32=True, bos_token_id=100000, eos_token_id=100001,
    ),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts of width 14,336, 2 per token.
    "mixtral_8x7b": ModelConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        num_experts=8, experts_per_token=2, bos_token_id=1, eos_token_id=2,
    ),
    # openai/gpt-oss-20b (20,914,757,184 params, 4,187,440,704 active counting the embeddings):
    # 24 layers alternating sliding (128) and full attention with sinks and biases, YaRN x32 of
    # a 4k original context, 32 experts of width 2,880 (4 per token) with biases and the clamped
    # SwiGLU. Its config.json, not transformers' GptOssConfig defaults (gpt-oss-120b's 36 layers
    # and 128 experts).
    "gpt_oss_20b": ModelConfig(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_layers=24,
        num_heads=64, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=150000.0,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 4096},
        max_position_embeddings=131072, norm="rms_f32", qkv_bias=True, o_bias=True, attention_sinks=True,
        sliding_window=128, layer_types=("sliding_attention", "full_attention") * 12, activation="clamped_swiglu",
        num_experts=32, experts_per_token=4, norm_topk_prob=True, router_logit_bias=True, expert_bias=True,
        swiglu_limit=7.0, swiglu_alpha=1.702, eos_token_id=200002, pad_token_id=199999,
    ),
    # Qwen/Qwen3.5-0.8B's text model: 24 layers, three Gated DeltaNet layers to one gated full-
    # attention layer (6 x (3 linear + 1 full)), head dim 256 with a quarter of it rotated (theta
    # 10M), MLP 3,584, 248,320-token vocabulary, 262k context, linear heads 16 key / 16 value of
    # 128 dims, tied embeddings: the values of its released config.json's text_config (checked
    # against copies of that file quoted in public code, 2026-12-05).
    "qwen3_5_0_8b": ModelConfig(
        model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_layers=24,
        num_heads=8, num_kv_heads=2, head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
        partial_rotary_factor=0.25, max_position_embeddings=262144, tie_word_embeddings=True, **_QWEN3_5,
        layer_types=_qwen3_5_layers(24), linear_num_key_heads=16, linear_num_value_heads=16,
    ),
    # Qwen/Qwen3.5-35B-A3B's text model: 40 layers (10 x (3 linear + 1 full)), 256 routed experts
    # of width 512 (8 per token) and a gated shared expert of 512 in every layer; the sizes of its
    # model card, which transformers' Qwen3_5MoeTextConfig defaults also describe (its linear
    # heads: 16 key, 32 value, 128 dims); theta 10M.
    "qwen3_5_35b_a3b": ModelConfig(
        model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048, intermediate_size=512, num_layers=40,
        num_heads=16, num_kv_heads=2, head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
        partial_rotary_factor=0.25, max_position_embeddings=262144, **_QWEN3_5, layer_types=_qwen3_5_layers(40),
        linear_num_key_heads=16, linear_num_value_heads=32, num_experts=256, experts_per_token=8,
        moe_intermediate_size=512, norm_topk_prob=True, shared_expert_size=512, shared_expert_gate=True,
    ),
    # microsoft/phi-4 (14,659,507,200 params): a Phi-3 architecture (fused qkv / gate_up
    # tensors in its checkpoint), full attention on every layer, untied, 16k context.
    "phi4_14b": ModelConfig(
        model_type="phi3", vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_layers=40,
        num_heads=40, num_kv_heads=10, rms_norm_eps=1e-5, rope_theta=250000.0, max_position_embeddings=16384,
        bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {', '.join(PRESETS)}") from None
