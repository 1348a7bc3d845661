"""gpt-oss beyond logits parity (tests/test_models_parity.py): attention sinks in every backend,
the experts each token is routed to, MXFP4 checkpoints dequantized as transformers does or kept
in MXFP4 as a QLoRA base (lora.base_quantization=mxfp4: the checkpoint's codes, the dequantized
model's logits, 4.25 bits a weight, a run that learns and a PEFT adapter transformers
reproduces), the released config read (parameter count as transformers' model; the
gpt_oss_20b preset), context and expert parallelism, and an SFT run from an HF folder."""

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
    active; written back without the quantization_config, with the keys jaxft does not model.
    The gpt_oss_20b preset (what `jaxft plan` sizes) is this architecture."""
    from jaxft.models.presets import get_preset

    cfg = config_from_hf(GPT_OSS_20B)
    assert get_preset("gpt_oss_20b") == cfg.replace(extra_hf_config={})
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


def mxfp4_folder(path, *, layers: int = 2):
    """A tiny random gpt-oss HF folder with the bundled tokenizer (E = F = 64: whole MXFP4 blocks)
    whose experts are stored as the released checkpoints store them: random `*_blocks` /
    `*_scales` (exponents 118-122, weights up to 6 / 32) and the quantization_config."""
    from safetensors.numpy import load_file, save_file

    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model

    tokenizer = load_bundled_tokenizer()
    vocab_size = len(tokenizer)
    hf_config = {**GPT_OSS_20B, "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 64,
                 "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2, "sliding_window": 8,
                 "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
                 "max_position_embeddings": 4096, "torch_dtype": "float32", "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    del hf_config["quantization_config"]
    folder = save_hf(create_model(config_from_hf(hf_config), seed=7), path, tokenizer=tokenizer)
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(1)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        X, cols, rows = tensors.pop(name).shape  # [X, in, out] -> blocks [X, out, in / 32, 16]
        tensors[name + "_blocks"] = rng.integers(0, 256, (X, rows, cols // 32, 16), dtype=np.uint8)
        tensors[name + "_scales"] = rng.integers(118, 123, (X, rows, cols // 32), dtype=np.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = GPT_OSS_20B["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def mxfp4_tiny(tmp_path_factory):
    return mxfp4_folder(tmp_path_factory.mktemp("mxfp4") / "hf")


def mxfp4_base(folder, cfg, mesh):
    """(graphdef, adapters, base, its shardings) of `cfg` on `mesh`, the experts kept in MXFP4 as
    a run keeps them (`jaxft.models.from_config.load_trainable`)."""
    from jaxft.models import abstract_model, load_weights
    from jaxft.models.adapters import init_adapters
    from jaxft.models.from_config import split_params
    from jaxft.models.quantize import quantized_shardings, quantizer
    from jaxft.parallel.sharding import param_shardings

    with jax.set_mesh(mesh):
        _, abstract = nnx.split(abstract_model(cfg.replace(lora=None)), nnx.Param)
        kernels = nnx.to_pure_dict(param_shardings(abstract, mesh))
        shardings = quantized_shardings(cfg, nnx.to_pure_dict(abstract), kernels, "mxfp4", mesh)
        _, base = split_params(load_weights(folder, cfg.replace(lora=None), mesh=mesh, keep_mxfp4=True,
                                            transform=quantizer(cfg, "mxfp4", shardings)))
        graphdef, adapters = init_adapters(cfg, seed=3, mesh=mesh)
    return graphdef, adapters, base, shardings


def test_an_mxfp4_qlora_base_keeps_the_checkpoints_codes_and_gives_the_dequantized_models_logits(mxfp4_tiny):
    """lora.base_quantization=mxfp4 on an MXFP4 checkpoint: the routed experts stay the
    checkpoint's own codes and exponents (gate and up split from gate_up_proj's alternating
    rows), sharded like their kernels; attention and the router stay float. With adapters (zero
    or trained) the logits equal the dequantized model's with the same adapters; re-quantizing
    the dequantized experts gives back their values exactly."""
    from safetensors.numpy import load_file

    from jaxft.models import mxfp4
    from jaxft.models.lora import PROJECTIONS, LoRASpec
    from jaxft.models.quantize import QuantizedKernel, quantize_kernel
    from jaxft.parallel import sharding

    folder = mxfp4_tiny
    full = load_hf(folder)
    cfg = full.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    mesh = sharding.make_mesh(fsdp=2, devices=jax.devices()[:2])
    graphdef, adapters, base, shardings = mxfp4_base(folder, cfg, mesh)
    mlp = base["layers"]["mlp"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        kernel = mlp[name]
        assert isinstance(kernel, QuantizedKernel) and kernel.kind == "mxfp4" and kernel.block == 32
        assert kernel.codes.dtype == jnp.uint4 and kernel.scale.dtype == jnp.uint8
        assert kernel.codes.sharding.spec == shardings["layers"]["mlp"][name].codes.spec
    assert not isinstance(base["layers"]["self_attn"]["q_proj"], QuantizedKernel)
    assert not isinstance(mlp["router"], QuantizedKernel)
    stored = load_file(folder / "model.safetensors")
    want = mxfp4.unpack(stored["model.layers.1.mlp.experts.gate_up_proj_blocks"],
                        stored["model.layers.1.mlp.experts.gate_up_proj_scales"])
    np.testing.assert_array_equal(np.asarray(mlp["up_proj"].codes[1]).astype(np.int32),
                                  want.codes[..., 1::2].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(mlp["up_proj"].scale[1]), want.exponents[..., 1::2])

    _, full_params = nnx.split(full, nnx.Param)
    leaves, tree = jax.tree.flatten(adapters)  # trained adapters: B off zero
    trained = jax.tree.unflatten(tree, [jax.device_put(x + 0.05 * jax.random.normal(jax.random.key(i), x.shape),
                                                       x.sharding) for i, x in enumerate(leaves)])  # one compile
    forward = jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(jnp.asarray(TOKENS)))
    with jax.set_mesh(mesh):
        outs = [(np.asarray(forward(a, base)), np.asarray(forward(a, full_params))) for a in (adapters, trained)]
    for ours, dequantized in outs:
        assert np.abs(ours - dequantized).max() < 1e-6
    assert np.abs(outs[1][0] - outs[0][0]).max() > 1e-2  # the trained adapters count
    gate = nnx.to_pure_dict(full_params)["layers"]["mlp"]["gate_proj"]
    requantized = jax.jit(lambda k: quantize_kernel(k, "mxfp4", 1, 1).dequantize(jnp.float32))(gate)
    np.testing.assert_array_equal(np.asarray(requantized), np.asarray(gate))


def test_an_mxfp4_base_takes_4_25_bits_a_weight_and_is_dequantized_one_layer_at_a_time(mxfp4_tiny, tmp_path):
    """XLA's memory analysis of the compiled forward: the arguments are the MXFP4 experts at 4.25
    bits a weight (4-bit codes, one 8-bit exponent per 32) plus the float rest; the temporaries of
    a 4-layer model exceed a 2-layer one's by less than one layer's dequantized experts (each
    layer's experts dequantized inside the layer loop, not the whole stack up front)."""
    from jaxft.models.lora import LoRASpec
    from jaxft.models.quantize import QuantizedKernel
    from jaxft.parallel import sharding

    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    temps = {}
    for layers in (2, 4):
        folder = mxfp4_tiny if layers == 2 else mxfp4_folder(tmp_path / "hf", layers=layers)
        cfg = load_hf(folder).cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=("q_proj",)))
        graphdef, adapters, base, _ = mxfp4_base(folder, cfg, mesh)
        experts = [x for x in jax.tree.leaves(base, is_leaf=lambda x: isinstance(x, QuantizedKernel))
                   if isinstance(x, QuantizedKernel)]
        weights = sum(x.codes.size for x in experts)
        assert weights == layers * 3 * 4 * 64 * 64
        bits = sum(x.codes.size * 4 + x.scale.size * 8 for x in experts) / weights
        assert bits == 4.25
        rest = sum(x.nbytes for x in jax.tree.leaves(base) if x.dtype not in (jnp.uint4, jnp.uint8))
        rest += sum(x.nbytes for x in jax.tree.leaves(adapters))
        with jax.set_mesh(mesh):
            compiled = jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(jnp.asarray(TOKENS))).lower(adapters, base).compile()
        memory = compiled.memory_analysis()
        assert memory.argument_size_in_bytes == rest + weights * 4.25 / 8
        temps[layers] = memory.temp_size_in_bytes
    one_layer = 3 * 4 * 64 * 64 * 4  # gate, up and down of 4 experts dequantized, float32
    per_layer = (temps[4] - temps[2]) / 2
    print(f"temporaries: 2 layers {temps[2]:,} B, 4 layers {temps[4]:,} B: {per_layer:,.0f} B a layer; "
          f"one layer's experts dequantized {one_layer:,} B")
    # CPU's XLA holds a uint4 stack's codes one a byte (1 byte a weight a layer); dequantized up
    # front, each layer would add its float32 experts (4 bytes a weight)
    assert per_layer < one_layer / 2


def test_lora_on_an_mxfp4_base_learns_and_its_peft_adapter_gives_jaxfts_logits_in_transformers(mxfp4_tiny, tmp_path):
    """A QLoRA run with lora.base_quantization=mxfp4 from an MXFP4 gpt-oss folder: the loss
    falls, the run writes the PEFT adapter only, and PEFT's model (transformers' dequantized
    gpt-oss with that adapter) gives jaxft's logits for the adapter on the MXFP4 base."""
    peft = pytest.importorskip("peft")
    from jaxft import config as config_lib
    from jaxft.io.metrics import read_metrics
    from jaxft.models.from_config import lora_spec
    from jaxft.models.peft import load_peft
    from jaxft.parallel import sharding
    from jaxft.run import run
    from tests.quickstart_subset import sft_data
    from tests.test_families import RUN

    folder = mxfp4_tiny
    config = config_lib.load("configs/sft.py:tiny", {
        **RUN, **sft_data(tmp_path, 64), "data.eval": "", "model.path": str(folder), "optim.lr": 5e-3,
        "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "all-linear", "lora.base_quantization": "mxfp4"})
    result = run(config, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(result.workdir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert result.export_dir is None and (result.adapter_dir / "adapter_model.safetensors").is_file()

    cfg = load_hf(folder).cfg.replace(lora=lora_spec(config))
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    graphdef, _, base, _ = mxfp4_base(folder, cfg, mesh)
    with jax.set_mesh(mesh):
        adapters = load_peft(result.adapter_dir, cfg, mesh)
        ours = np.asarray(nnx.merge(graphdef, adapters, base)(jnp.asarray(TOKENS)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), attn_implementation="eager")
    assert np.abs(ours - hf_logits(reference, TOKENS)).max() > 1e-3  # the adapter does something
    model = peft.PeftModel.from_pretrained(reference, str(result.adapter_dir)).eval()
    assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4


def test_mxfp4_rounds_as_ocp_says_and_refuses_a_dense_model():
    """`mxfp4.quantize`: each block's exponent floor(log2(absmax)) - 2, each value to its nearest
    FP4 value (ties to the even code; 7 saturates to 6) times 2 ** exponent; the dequantized
    values equal that rounding on Gaussian weights. lora.base_quantization=mxfp4 on a dense
    model is refused, naming the key."""
    from jaxft.errors import ConfigError
    from jaxft.models import mxfp4
    from jaxft.models.presets import get_preset
    from jaxft.models.quantize import quantize_base, quantize_kernel

    row = jnp.asarray([[6.0, -4.0, 2.5, 1.25, 0.25, 0.75, 5.0, -7.0] + [0.0] * 24], jnp.float32).T  # [32 in, 1 out]
    codes, exponents = mxfp4.quantize(row, axis=0)
    assert int(exponents[0, 0]) == 127  # absmax 7: floor(log2 7) - 2 = 0
    values = mxfp4.FP4_VALUES[np.asarray(codes[:8, 0]).astype(np.int32)]
    np.testing.assert_array_equal(values, [6.0, -4.0, 2.0, 1.0, 0.0, 1.0, 4.0, -6.0])

    x = jax.random.normal(jax.random.key(0), (2, 96, 40))  # [experts, in, out]
    q = quantize_kernel(x, "mxfp4", 1, 1)
    assert q.codes.dtype == jnp.uint4 and q.scale.shape == (2, 3, 40) and q.block == 32
    blocks = np.asarray(x).reshape(2, 3, 32, 40)
    scale = 2.0 ** (np.floor(np.log2(np.abs(blocks).max(axis=2, keepdims=True))) - 2)
    levels = np.unique(np.abs(mxfp4.FP4_VALUES))
    nearest = levels[np.argmin(np.abs(np.abs(blocks / scale)[..., None] - levels), axis=-1)] * np.sign(blocks)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), (nearest * scale).reshape(x.shape))
    with pytest.raises(ConfigError, match=r"lora\.base_quantization='mxfp4'.*llama"):
        quantize_base(get_preset("tiny"), {}, "mxfp4")
