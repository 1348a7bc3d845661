"""The Gemma 2 / Gemma 3 / Phi-4 / MoE presets describe the published checkpoints: the parameter count
each model card gives, in jaxft (ModelConfig.num_params and the built model's shapes) and in
transformers (the same config.json, its model built on the meta device), and the parts their
config.json sets (attention pattern, window, soft-caps, per-layer RoPE)."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxft import config as config_lib
from jaxft.models import abstract_model, config_to_hf, get_preset
from jaxft.models.config import config_from_hf
from jaxft.perf import plan as plan_lib

REPO = Path(__file__).resolve().parents[1]

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))

# Parameters of each published checkpoint (Gemma 3: the text model of the -it checkpoint, its
# vision tower left out), and (sliding layers, full layers).
PUBLISHED = {
    "gemma2_9b": (9_241_705_984, (21, 21)),
    "gemma3_4b": (3_880_263_168, (29, 5)),
    "gemma3_27b": (27_009_346_304, (52, 10)),
    "phi4_14b": (14_659_507_200, None),
    "qwen3_30b_a3b": (30_532_122_624, None),
    "mixtral_8x7b": (46_702_792_704, None),
    "deepseek_v2_lite": (15_706_484_224, None),  # "15.7B" (transformers' meta-device model: the same)
}


@pytest.mark.parametrize("name, active", [("qwen3_30b_a3b", 3_353_032_704), ("mixtral_8x7b", 12_879_925_248),
                                          ("deepseek_v2_lite", 2_661_150_208)])
def test_moe_presets_count_the_params_a_token_uses(name, active):
    """Qwen3-30B-A3B "3B active", Mixtral-8x7B 12.9B active, DeepSeek-V2-Lite "2.4B active"
    (2.45B without the input embeddings): the FLOPs model's parameter count."""
    from jaxft.io.metrics import train_flops_per_token

    cfg = get_preset(name)
    assert cfg.num_params(active=True) == active
    dims = cfg.dim_per_head if cfg.kv_lora_rank is None else (128 + 64 + 128) / 2  # MLA: q.k 192 dims, values 128
    attention = 6 * cfg.num_layers * cfg.num_heads * dims * 4096
    assert train_flops_per_token(cfg, 4096) == 6.0 * (active - cfg.vocab_size * cfg.hidden_size) + attention


def test_qwen3_5_flops_count_attention_on_its_full_layers_only():
    """Qwen3.5-0.8B: 6 of its 24 layers attend (quadratic in the length); the 18 linear ones run the
    chunked delta rule, per token 3 x (value heads (6 K V + 4 L V) + key heads 4 L K) at L = 32."""
    from jaxft.io.metrics import train_flops_per_token

    cfg = get_preset("qwen3_5_0_8b")
    matmul = cfg.num_params(active=True) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 6 * 6 * cfg.num_heads * cfg.dim_per_head * 4096
    linear = 18 * 3 * (16 * (6 * 128 * 128 + 4 * 32 * 128) + 16 * 4 * 32 * 128)
    assert sum(s.linear for s in cfg.layer_specs()) == 18
    assert train_flops_per_token(cfg, 4096) == 6.0 * matmul + attention + linear


def _hf_model(cfg):
    """transformers' model of `cfg`'s config.json, on the meta device (nothing allocated)."""
    import torch
    import transformers

    hf = config_to_hf(cfg)
    hf.pop("architectures")
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        return config, transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_presets_have_the_published_parameter_counts(name):
    cfg = get_preset(name)
    count, pattern = PUBLISHED[name]
    built = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
    assert built == cfg.num_params() == count
    if pattern is None:
        assert cfg.layer_types is None and cfg.sliding_window is None
    else:
        assert (cfg.layer_types.count("sliding_attention"), cfg.layer_types.count("full_attention")) == pattern
        assert cfg.layer_types[0] == "sliding_attention"  # both Gemmas start with a sliding layer
    # What we write as config.json reads back as the same model.
    back = config_from_hf(config_to_hf(cfg), dtype="float32")
    changed = [f.name for f in dataclasses.fields(cfg)
               if f.compare and f.name != "head_dim" and getattr(back, f.name) != getattr(cfg, f.name)]
    assert not changed and back.dim_per_head == cfg.dim_per_head
    if not HAS_TORCH:
        return
    config, model = _hf_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert list(getattr(config, "layer_types", None) or []) == list(cfg.layer_types or [])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_transformers_reads_the_family_parts_of_the_presets():
    gemma2, _ = _hf_model(get_preset("gemma2_9b"))
    assert (gemma2.sliding_window, gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping,
            gemma2.query_pre_attn_scalar, gemma2.hidden_activation) == (4096, 50.0, 30.0, 256, "gelu_pytorch_tanh")
    for name, scalar in (("gemma3_4b", 256), ("gemma3_27b", 168)):
        gemma3, _ = _hf_model(get_preset(name))
        assert (gemma3.sliding_window, gemma3.query_pre_attn_scalar, gemma3.max_position_embeddings) == (
            1024, scalar, 131072)
        assert gemma3.attn_logit_softcapping is None and gemma3.final_logit_softcapping is None
        rope = gemma3.rope_parameters  # transformers 5: one RoPE per layer type
        assert rope["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
        assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    phi4, _ = _hf_model(get_preset("phi4_14b"))
    assert (phi4.rope_parameters["rope_theta"], phi4.max_position_embeddings, phi4.sliding_window,
            phi4.tie_word_embeddings) == (250_000.0, 16384, None, False)


def _config_presets(kind):
    spec = importlib.util.spec_from_file_location(f"{kind}_presets", REPO / f"configs/{kind}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRESETS


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_every_config_preset_loads_and_validates(kind):
    presets = _config_presets(kind)
    assert {"gemma3_4b", "gemma3_4b_qlora"} <= set(presets)
    for name in presets:
        overrides = {} if name == "tiny" else {"model.path": "/models/m", "data.train": "train.jsonl"}
        config_lib.validate(config_lib.load(f"{REPO}/configs/{kind}.py:{name}", overrides))


@pytest.mark.parametrize("kind,full_lr,adapter_lr", [("sft", 2e-5, 2e-4), ("dpo", 5e-7, 5e-6)])
def test_the_gemma3_4b_presets_follow_the_gemma_guides(kind, full_lr, adapter_lr):
    # On the gemma3_4b architecture (what `jaxft plan --config.model.preset=gemma3_4b` builds):
    # full fine-tuning at the full lr; QLoRA as Google's guide (NF4, r=16, alpha=16, all-linear,
    # gradient clip 0.3) at the adapter lr.
    full, qlora = (config_lib.load(f"{REPO}/configs/{kind}.py:{name}", {"model.preset": "gemma3_4b"})
                   for name in ("gemma3_4b", "gemma3_4b_qlora"))
    assert full.optim.lr == full_lr and full.lora.rank == 0 and full.optim.clip_norm == 1.0
    assert qlora.optim.lr == adapter_lr and qlora.optim.clip_norm == 0.3 and qlora.model.dtype == "bfloat16"
    assert (qlora.lora.rank, qlora.lora.alpha, qlora.lora.targets, qlora.lora.base_quantization) == (
        16, 16.0, "all-linear", "nf4")
    cfg = plan_lib.plan_model_config(qlora)
    assert cfg.model_type == "gemma3_text" and cfg.num_layers == 34 and cfg.vocab_size == 262208
    assert cfg.lora is not None and cfg.lora.rank == 16 and cfg.compute_dtype == jnp.bfloat16


def test_a_shallower_body_keeps_its_layer_kinds():
    """`jaxft bench --layers N` on a Gemma preset: the first N layers with their kinds (the
    gemma3_270m bench runs 6 = five sliding and one global), cyclic past the end."""
    from jaxft.perf.bench_setup import bench_config

    cfg, _ = bench_config("gemma3_270m", overrides={"num_layers": 6})
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert get_preset("gemma2_9b").with_layers(3).layer_types == (
        "sliding_attention", "full_attention", "sliding_attention")
    assert get_preset("gemma3_270m").num_params() == 268_098_176  # google/gemma-3-270m
    assert get_preset("llama3_8b").with_layers(2).layer_types is None
