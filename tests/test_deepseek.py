"""DeepSeek-V2 / V3 beyond logits parity (tests/test_models_parity.py): YaRN against
transformers' RoPE init, the experts each token is routed to, greedy generation through the
compressed (latent) KV cache against transformers' `generate`, the frozen selection bias,
SFT / DPO runs from an HF folder, and an NF4 QLoRA run with its experts and latent attention
quantized (LoRA's PEFT export: tests/test_families.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
import transformers
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import init_cache, load_hf
from jaxft.models.layer_groups import layer_path
from jaxft.models.moe import route
from jaxft.models.paths import get_path
from jaxft.models.rope import Rope, inv_freqs, softmax_mscale
from tests.hf_reference import make_hf_model

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (HF folder, transformers model)} of the parity rows (tests/hf_reference.py)."""
    out = {}
    for family in ("deepseek_v2", "deepseek_v3"):
        folder = tmp_path_factory.mktemp(family)
        model = make_hf_model(family)
        model.save_pretrained(folder)
        out[family] = (folder, model)
    return out


@pytest.mark.parametrize("scaling", [
    # DeepSeek-V2-Lite's: mscale / mscale_all_dim set the attention factor (1 here), truncated ramp
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    # plain YaRN (Qwen-style): attention factor 0.1 ln(factor) + 1, untruncated ramp
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False},
])
def test_yarn_equals_transformers_rope_init(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    config = transformers.DeepseekV2Config(
        hidden_size=256, num_attention_heads=4, qk_rope_head_dim=64, max_position_embeddings=163840,
        rope_parameters={**scaling, "rope_theta": 10000.0})
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    freq, long, factor = inv_freqs(Rope(10000.0, scaling, 1.0, 163840), 64)
    assert long is None
    np.testing.assert_allclose(freq, want_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-7)
    assert softmax_mscale(scaling) == pytest.approx(yarn_apply_mscale(config.rope_parameters, 1.0), rel=1e-7)
    assert not np.allclose(freq, inv_freqs(Rope(10000.0, None), 64)[0])  # YaRN moved the low frequencies


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_each_token_goes_to_the_experts_transformers_picks(folders, family):
    """Every MoE layer's router input captured from transformers: jaxft's `route` on the loaded
    router (and V3's selection bias) picks the same k experts with the same weights."""
    folder, hf_model = folders[family]
    model = load_hf(folder)
    cfg = model.cfg
    captured = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, (args[0].reshape(-1, cfg.hidden_size), out)))
        for i, layer in enumerate(hf_model.model.layers) if cfg.is_moe_layer(i)]
    with torch.no_grad():
        hf_model(input_ids=torch.from_numpy(TOKENS))
    for h in hooks:
        h.remove()
    state = nnx.state(model)
    assert sorted(captured) == [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    for i, (hidden, (_, hf_weights, hf_experts)) in captured.items():
        prefix, index = layer_path(cfg, i)
        mlp = lambda name: np.asarray(get_path(state, prefix + ("mlp", name))[...])[index]
        bias = jnp.asarray(mlp("e_score_correction_bias")) if cfg.router_bias else None
        weights, experts, _ = route(jnp.asarray(hidden.numpy()) @ mlp("router"), cfg.experts_per_token,
                                    normalize=cfg.norm_topk_prob, scoring=cfg.router_scoring,
                                    groups=cfg.router_groups, topk_groups=cfg.router_topk_groups, bias_X=bias,
                                    scale=cfg.routed_scaling_factor)
        ours, theirs = np.asarray(experts), hf_experts.numpy()
        order, hf_order = np.argsort(ours, axis=1), np.argsort(theirs, axis=1)
        np.testing.assert_array_equal(np.take_along_axis(ours, order, 1), np.take_along_axis(theirs, hf_order, 1))
        np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, 1),
                                   np.take_along_axis(hf_weights.numpy(), hf_order, 1), rtol=1e-5, atol=1e-7)
        if cfg.router_groups > 1:  # the group limit binds: every token's experts lie in topk_group groups
            groups = np.take_along_axis(ours, order, 1) // (cfg.num_experts // cfg.router_groups)
            assert max(len(set(row)) for row in groups.tolist()) <= cfg.router_topk_groups


def test_greedy_generation_through_the_latent_cache_equals_transformers(folders):
    """DeepSeek-V2 (layer 0 dense, then MoE; YaRN) decodes 8 tokens after a 7-token prompt as
    transformers' greedy `generate` with its own cache; the cache holds the latent and the shared
    RoPE key per layer and token, no per-head keys or values."""
    import jaxft.inference.generate as gen

    folder, hf_model = folders["deepseek_v2"]
    model = load_hf(folder)
    cfg = model.cfg
    prompt = TOKENS[0, :7].tolist()
    want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.generate(model, [prompt], max_new_tokens=8, eos_token_id=[], pad_token_id=0) == [want]
    cache = init_cache(cfg, batch_size=2, max_length=24)
    arrays = [x for path, x in jax.tree_util.tree_leaves_with_path(cache)
              if "segment_ids" not in jax.tree_util.keystr(path)]
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 16 + 8, vs 2 * H * D = 2 * 4 * 16 for full k / v
    assert sum(x.nbytes for x in arrays) == cfg.num_layers * 2 * 24 * per_token * 4


def test_the_selection_bias_is_not_decayed_and_a_lora_target_it_lacks_is_refused_naming_the_key(folders):
    """V3's e_score_correction_bias gets no weight decay (and no gradient: the SFT test below
    trains with decay and exports it unchanged); LoRA targets only on projections the model
    does not have (k_proj: latent attention has none) are refused naming lora.targets and
    what it has."""
    from jaxft.models.lora import LoRASpec
    from jaxft.steps.optimizer import decay_mask

    model = load_hf(folders["deepseek_v3"][0])
    mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))["groups"][1][0]["mlp"]
    assert not mask["e_score_correction_bias"] and mask["router"]
    with pytest.raises(ConfigError, match=r"lora\.targets=k_proj,v_proj: this deepseek_v3 model has none of these "
                                          r"projections; it has down_proj,gate_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"):
        model.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=("k_proj", "v_proj")))
    with pytest.raises(ConfigError, match=r"lora\.targets=q_proj: this deepseek_v3 model"):  # V3: q_a / q_b
        model.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=("q_proj",)))
    model.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=("k_proj", "kv_b_proj")))  # one it has: fine


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    """A tiny random DeepSeek-V3 (low-rank queries, sigmoid routing with a random selection
    bias, 8 experts in 4 groups, layer 0 dense) with the bundled tokenizer, as an HF folder."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, save_hf
    from jaxft.models.config import ModelConfig

    tok = load_bundled_tokenizer()
    cfg = ModelConfig(
        model_type="deepseek_v3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=3,
        num_heads=4, num_kv_heads=4, head_dim=8, rms_norm_eps=1e-6, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, num_experts=8,
        experts_per_token=2, moe_intermediate_size=32, shared_expert_size=32, dense_layers=(0,),
        router_scoring="sigmoid", router_groups=4, router_topk_groups=2, router_bias=True,
        routed_scaling_factor=2.5, router_f32=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = create_model(cfg, seed=7)
    bias = model.groups[1][0].mlp.e_score_correction_bias
    bias.set_value(0.1 * jax.random.normal(jax.random.key(3), bias[...].shape))
    return save_hf(model, tmp_path_factory.mktemp("deepseek") / "hf", tokenizer=tok)


def test_deepseek_sft_learns_keeps_its_bias_and_exports_to_transformers(tiny_deepseek, tmp_path):
    from tests.test_families import sft_learns_and_exports

    result, _ = sft_learns_and_exports(tiny_deepseek, tmp_path, "DeepseekV3ForCausalLM", **{"optim.weight_decay": 0.1})
    before, after = load_hf(tiny_deepseek), load_hf(result.export_dir)
    bias = lambda m: np.asarray(m.groups[1][0].mlp.e_score_correction_bias[...])
    np.testing.assert_array_equal(bias(after), bias(before))
    assert np.abs(np.asarray(after.groups[1][0].mlp.router[...]) - np.asarray(before.groups[1][0].mlp.router[...])).max() > 0


def test_deepseek_dpo_starts_at_ln2_and_learns(tiny_deepseek, tmp_path):
    from tests.test_families import dpo_starts_at_ln2_and_learns

    dpo_starts_at_ln2_and_learns(tiny_deepseek, tmp_path)


def test_deepseek_qlora_quantizes_experts_and_latent_attention_and_trains_adapters_on_them(tiny_deepseek, tmp_path):
    """An NF4 QLoRA base holds every matmul kernel of the layers as 4-bit codes: the stacked routed
    experts (most of an MoE's bytes), the shared experts, layer 0's dense MLP, the latent
    attention's projections; the router and its bias stay float32. A QLoRA run with adapters on
    all of them (all-linear: per-expert ones included) learns."""
    from jaxft import config as config_lib
    from jaxft.io.metrics import read_metrics
    from jaxft.models import load_weights
    from jaxft.models.config import read_hf_config
    from jaxft.models.from_config import split_params
    from jaxft.models.lora import PROJECTIONS, LoRASpec
    from jaxft.models.quantize import QuantizedKernel, quantized_bytes, quantizer
    from jaxft.run import run
    from tests.quickstart_subset import sft_data
    from tests.test_families import RUN

    cfg = read_hf_config(tiny_deepseek)
    lcfg = cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    _, params = split_params(load_weights(tiny_deepseek, cfg, transform=quantizer(lcfg, "nf4")))
    moe, attn = params["groups"][1][0]["mlp"], params["groups"][1][0]["self_attn"]
    dense = params["groups"][0][0]["mlp"]
    kernels = [moe[n] for n in ("gate_proj", "up_proj", "down_proj", "shared_gate_proj", "shared_up_proj",
                                "shared_down_proj")] + [dense["gate_proj"], dense["down_proj"]]
    kernels += [attn[n] for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    assert all(isinstance(k, QuantizedKernel) and k.codes.dtype == jnp.uint4 for k in kernels)
    experts = moe["gate_proj"]
    assert experts.shape == (2, 8, 64, 32)  # [layers, experts, embed, expert hidden]
    assert quantized_bytes(experts) <= 0.15 * experts.codes.size * 4  # vs float32: 4.5 bits a weight
    assert not isinstance(moe["router"], QuantizedKernel) and moe["router"].dtype == jnp.float32

    config = config_lib.load("configs/sft.py:tiny", {**RUN, **sft_data(tmp_path, 64), "data.eval": "",
                                                     "model.path": str(tiny_deepseek), "optim.lr": 5e-3,
                                                     "lora.rank": 4, "lora.alpha": 8.0,
                                                     "lora.base_quantization": "nf4"})
    result = run(config, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(result.workdir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses


def test_bfloat16_keeps_the_router_in_float32_and_skips_next_token_layers(folders, tmp_path):
    """In a bfloat16 model DeepSeek's router and selection bias stay float32 (transformers keeps
    them so), load and save so; a V3 folder's multi-token-prediction layer (a layer past
    num_hidden_layers, `num_nextn_predict_layers`) is left unread as transformers leaves it."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from jaxft.models import save_hf

    folder, hf_model = folders["deepseek_v3"]
    src = tmp_path / "src"
    hf_model.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((4, 8), np.float32)  # an MTP layer's tensor
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    model = load_hf(src, dtype=jnp.bfloat16)
    mlp = model.groups[1][0].mlp
    assert mlp.router[...].dtype == mlp.e_score_correction_bias[...].dtype == jnp.float32
    assert mlp.gate_proj[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(mlp.e_score_correction_bias[...])[0],
                                  tensors["model.layers.1.mlp.gate.e_score_correction_bias"])
    save_hf(model, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == np.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == np.float32
        assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight").get_dtype() == "BF16"


def test_deepseek_v3_counts_671b_params_37b_active_as_transformers():
    """transformers' default DeepseekV3Config is DeepSeek-V3's: jaxft reads it to 671.0B params,
    the count of transformers' meta-device model (its selection-bias buffers included), and
    37.6B used per token ("37B activated")."""
    from jaxft.models.config import config_from_hf

    config = transformers.DeepseekV3Config()
    cfg = config_from_hf({**config.to_dict(), "model_type": "deepseek_v3"})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    want = sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == want == 671_026_419_200
    assert cfg.num_params(active=True) == 37_552_297_472
    assert (cfg.router_groups, cfg.router_topk_groups, cfg.dense_layers) == (8, 4, (0, 1, 2))


def test_deepseek_on_a_mesh_equals_one_device(folders):
    """MLA (heads over the tensor axis, latents replicated) and group-limited routing with shared
    experts on a (data 2, fsdp 2, tensor 2) mesh: one device's loss and gradients, packed rows."""
    from tests.test_families import assert_mesh_equals_one_device

    def picks(grads, cfg):
        attn, mlp = grads["groups"][1][0]["self_attn"], grads["groups"][1][0]["mlp"]
        return [attn["kv_b_proj"][...], attn["q_proj"][...], mlp["router"][...], mlp["shared_gate_proj"][...]]

    assert_mesh_equals_one_device(folders["deepseek_v2"][0], dict(data=2, fsdp=2, tensor=2), picks, atol_scale=1e-4)
