"""gpt-oss beyond logits parity (tests/test_models_parity.py): attention sinks in every backend,
the experts each token is routed to, MXFP4 checkpoints dequantized as transformers does, the
released config read (parameter count as transformers' model), context and expert
parallelism, and an SFT run from an HF folder."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
import transformers
from flax import nnx

from jaxft.models import load_hf, save_hf
from jaxft.models.attention import attend
from jaxft.models.config import config_from_hf, config_to_hf
from jaxft.models.layer_groups import layer_path
from jaxft.models.moe import route
from jaxft.models.mxfp4 import dequantize
from jaxft.models.paths import get_path
from tests.hf_reference import COMMON, FAMILIES, hf_logits, make_hf_model

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))

# openai/gpt-oss-20b's config.json (as released: MXFP4 experts, transformers 4.55 spelling)
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(HF folder, transformers model) of the gpt_oss parity row (tests/hf_reference.py)."""
    path = tmp_path_factory.mktemp("gpt_oss")
    model = make_hf_model("gpt_oss")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_in_every_backend_equal_the_reference_in_values_and_gradients(window):
    """Sinks join each row's softmax denominator: blockwise (a differentiable log-sum-exp),
    xla / cudnn / splash (which run reference / blockwise for them) equal the reference in the
    output and in the gradients of q, k, v and the sinks, on packed GQA rows; very negative
    sinks give plain attention, and sinks of 0 are not it."""
    B, L, H, K, D = 2, 40, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(B, L, H, D), (B, L, K, D), (B, L, K, D)])
    sinks = jnp.asarray(rng.normal(size=(H,)), jnp.float32)
    seg = jnp.asarray(np.array([[1] * 25 + [2] * 13 + [0] * 2, [1] * 40]))

    def loss(impl, q, k, v, sinks):
        out = attend(q, k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg, sliding_window=window,
                     implementation=impl, sinks_H=sinks, block_q=8, block_k=16)
        return jnp.sum(jnp.where(seg[:, :, None, None] > 0, jnp.sin(out), 0.0))

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    want, want_grads = value_and_grads("reference", q, k, v, sinks)
    for impl in ("blockwise", "xla", "cudnn", "splash"):
        got, grads = value_and_grads(impl, q, k, v, sinks)
        assert float(got) == pytest.approx(float(want), abs=1e-4), impl
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, err_msg=impl)
    plain = loss("reference", q, k, v, None)
    assert float(loss("blockwise", q, k, v, jnp.full((H,), -1e4))) == pytest.approx(float(plain), abs=1e-4)
    assert abs(float(loss("blockwise", q, k, v, jnp.zeros((H,)))) - float(plain)) > 1.0


def test_each_token_goes_to_the_experts_transformers_picks(folder):
    """Every layer's router input captured from transformers: jaxft's router (weight and bias)
    and `route` pick the same k experts with the same weights (softmax of the top-k logits)."""
    path, hf_model = folder
    model = load_hf(path)
    cfg = model.cfg
    captured = {}
    hooks = [layer.mlp.router.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, (args[0], out)))
             for i, layer in enumerate(hf_model.model.layers)]
    with torch.no_grad():
        hf_model(input_ids=torch.from_numpy(TOKENS))
    for h in hooks:
        h.remove()
    state = nnx.state(model)
    assert sorted(captured) == list(range(cfg.num_layers))
    for i, (hidden, (_, hf_weights, hf_experts)) in captured.items():
        prefix, index = layer_path(cfg, i)
        router = np.asarray(get_path(state, prefix + ("mlp", "router"))[...])[index]
        bias = np.asarray(get_path(state, prefix + ("mlp", "router_logit_bias"))[...])[index]
        logits = jnp.asarray(hidden.numpy()) @ router + bias[None, :]
        weights, experts, _ = route(logits, cfg.experts_per_token, normalize=True)
        np.testing.assert_array_equal(np.asarray(experts), hf_experts.numpy())
        np.testing.assert_allclose(np.asarray(weights), hf_weights.numpy(), atol=1e-6)


@pytest.mark.parametrize("matmul", ["ragged", "blocks"])
def test_expert_biases_and_clamped_swiglu_in_the_grouped_matmuls_equal_a_per_token_loop(matmul):
    """gpt-oss's experts in both row layouts (ragged: TPU / GPU, blocks: CPU): each row gets its
    expert's gate / up / down bias and the clamped SwiGLU (a limit that binds), equal to summing
    weights x expert(x) token by token; the bias gradients equal the loop's."""
    from jaxft.models.moe import dropless_experts
    from jaxft.models.parts import gated

    rng = np.random.default_rng(3)
    T, E, F, X, K = 12, 8, 6, 4, 2
    x, gate, up, down, bg, bu, bd = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                                     [(T, E), (X, E, F), (X, E, F), (X, F, E), (X, F), (X, F), (X, E)])
    experts = jnp.asarray(np.stack([rng.permutation(X)[:K] for _ in range(T)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)

    def ours(bg, bu, bd):
        return dropless_experts(x, weights, experts, gate, up, down, "clamped_swiglu", matmul,
                                biases=(bg, bu, bd), limit=1.0, alpha=1.702)

    def loop(bg, bu, bd):
        rows = []
        for t in range(T):
            y = jnp.zeros(E)
            for k in range(K):
                e = int(experts[t, k])
                h = gated("clamped_swiglu", x[t] @ gate[e] + bg[e], x[t] @ up[e] + bu[e], limit=1.0, alpha=1.702)
                y = y + weights[t, k] * (h @ down[e] + bd[e])
            rows.append(y)
        return jnp.stack(rows)

    np.testing.assert_allclose(np.asarray(ours(bg, bu, bd)), np.asarray(loop(bg, bu, bd)), atol=1e-5)
    probe = jnp.asarray(rng.normal(size=(T, E)), jnp.float32)
    for got, want in zip(jax.grad(lambda *b: jnp.sum(ours(*b) * probe), argnums=(0, 1, 2))(bg, bu, bd),
                         jax.grad(lambda *b: jnp.sum(loop(*b) * probe), argnums=(0, 1, 2))(bg, bu, bd)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_mxfp4_dequantization_equals_transformers():
    """Random MXFP4 blocks and scales dequantize to exactly transformers'
    `convert_moe_packed_tensors` values (bfloat16), in its layout."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 2, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 10, 2), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    got = dequantize(blocks, scales)
    assert got.shape == (3, 64, 10) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.float().numpy())


def test_mxfp4_checkpoint_loads_as_transformers_dequantizes_it_and_saves_unquantized(tmp_path):
    """A tiny gpt-oss whose experts are stored as MXFP4 blocks / scales (as the released ones,
    with their quantization_config): jaxft's logits equal transformers' with
    Mxfp4Config(dequantize=True); the export holds the dequantized experts, no
    quantization_config, and transformers loads it with the same logits."""
    from safetensors.torch import load_file, save_file

    config_cls, extra = FAMILIES["gpt_oss"]
    E, F, X = COMMON["hidden_size"], 64, extra["num_local_experts"]  # MXFP4 blocks of 32: F a multiple
    config = config_cls(**{**COMMON, **extra, "intermediate_size": F})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    rng = np.random.default_rng(1)
    for i in range(config.num_hidden_layers):
        for name, rows, cols in (("gate_up_proj", 2 * F, E), ("down_proj", E, F)):
            full = f"model.layers.{i}.mlp.experts.{name}"
            del tensors[full]
            tensors[full + "_blocks"] = torch.from_numpy(rng.integers(0, 256, (X, rows, cols // 32, 16), dtype=np.uint8))
            tensors[full + "_scales"] = torch.from_numpy(rng.integers(122, 126, (X, rows, cols // 32), dtype=np.uint8))
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((tmp_path / "src" / "config.json").read_text())
    hf_config["quantization_config"] = GPT_OSS_20B["quantization_config"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_config))

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "src", quantization_config=transformers.Mxfp4Config(dequantize=True), attn_implementation="eager")
    want = hf_logits(reference, TOKENS)
    model = load_hf(tmp_path / "src")
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - want).max() < 1e-4
    out = save_hf(model, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, atol=1e-5)


def test_released_config_reads_to_transformers_parameter_count():
    """gpt-oss-20b's config.json: alternating layers, YaRN from rope_scaling, 32 experts top 4,
    the clamp; its parameter count equals transformers' meta-device model's, 4 experts' worth
    active; written back without the quantization_config, with the keys jaxft does not model."""
    cfg = config_from_hf(GPT_OSS_20B)
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention") and cfg.sliding_window == 128
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["truncate"] is False
    assert (cfg.num_experts, cfg.experts_per_token, cfg.swiglu_limit) == (32, 4, 7.0)
    with torch.device("meta"):
        hf = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{
            k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"}))
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
    X, E, F, N = 32, 2880, 2880, 24
    assert cfg.num_params() - cfg.num_params(active=True) == N * (X - 4) * (3 * E * F + 2 * F + E)
    out = config_to_hf(cfg)
    assert "quantization_config" not in out
    assert out["router_aux_loss_coef"] == 0.9 and out["experts_per_token"] == 4 and out["initial_context_length"] == 4096


@pytest.mark.parametrize("axes", [dict(data=2, sequence=4), dict(fsdp=2, expert=2, tensor=2)],
                         ids=["context-parallel", "expert-parallel"])
def test_sinks_and_expert_biases_on_a_mesh_equal_one_device(folder, axes):
    """Each row's tokens split over a sequence axis (attention per shard, the sinks inside the
    shard_map), or the experts and their biases split over an expert axis (pairs sent to them by
    all-to-all): the loss and the gradients of the sinks, expert and router biases equal one
    device's."""
    from tests.test_families import assert_mesh_equals_one_device

    def picks(grads, cfg):
        mlp = grads["layers"]["mlp"]
        return [grads["layers"]["self_attn"]["sinks"][...], mlp["gate_bias"][...], mlp["down_bias"][...],
                mlp["router_logit_bias"][...]]

    assert_mesh_equals_one_device(folder[0], axes, picks)


def test_gpt_oss_sft_learns_and_its_export_loads_in_transformers_with_equal_logits(tmp_path):
    """A tiny random gpt-oss (the released config's parts, window 16 < the 64-token rows) with the
    bundled tokenizer: SFT from its HF folder learns, and the export is a GptOssForCausalLM
    with jaxft's logits."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model
    from tests.test_families import sft_learns_and_exports

    tok = load_bundled_tokenizer()
    hf_config = {**GPT_OSS_20B, "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2, "sliding_window": 16,
                 "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 4096,
                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                 "torch_dtype": "float32"}
    del hf_config["quantization_config"]
    folder = save_hf(create_model(config_from_hf(hf_config), seed=7), tmp_path / "hf", tokenizer=tok)
    sft_learns_and_exports(folder, tmp_path, "GptOssForCausalLM")