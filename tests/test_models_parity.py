"""Logits parity with transformers (PyTorch fp32) for every family, packed rows, round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
import transformers

from jaxft.parallel import sharding
from jaxft.models import init_cache, load_hf, save_hf
from tests.hf_reference import COMMON, FAMILIES, hf_logits, make_hf_model

TOL = 1e-4
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, 97, size=(2, 16))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def test_logits_match_transformers(family_folder):
    family, folder, hf_model = family_folder
    model = load_hf(folder)
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    diff = np.abs(ours - hf_logits(hf_model, TOKENS)).max()
    print(f"{family}: max |logits diff| = {diff:.2e}")
    assert diff < TOL


def test_packed_row_equals_examples_run_separately(family_folder):
    family, folder, hf_model = family_folder
    model = load_hf(folder)
    a, b = TOKENS[0, :9], TOKENS[1, :5]
    row = np.zeros((1, 16), np.int64)
    row[0, :9], row[0, 9:14] = a, b
    segments = np.array([[1] * 9 + [2] * 5 + [0] * 2])
    positions = np.array([list(range(9)) + list(range(5)) + [0, 0]])
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments)))
    assert np.isfinite(packed).all()
    np.testing.assert_allclose(packed[0, :9], hf_logits(hf_model, a[None])[0], atol=TOL)
    np.testing.assert_allclose(packed[0, 9:14], hf_logits(hf_model, b[None])[0], atol=TOL)


def test_save_hf_round_trips_through_transformers(family_folder, tmp_path):
    family, folder, hf_model = family_folder
    save_hf(load_hf(folder), tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(hf_model, TOKENS), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma4_text", "qwen2_moe", "gpt_oss"])
def test_mixed_layers_scanned_equal_unrolled(family, tmp_path):
    """A scanned stack of sliding and global layers (each layer's kind switched in the scan;
    Gemma 4: a scan per group of layers of one shape) gives the logits and gradients of the
    unrolled layers (each kind static)."""
    from flax import nnx

    from jaxft.models.config import read_hf_config
    from jaxft.models.layer_groups import layer_path
    from jaxft.models.hf import load_weights
    from jaxft.models.paths import get_path

    make_hf_model(family).save_pretrained(tmp_path)
    scanned = load_hf(tmp_path)
    unrolled = load_weights(tmp_path, read_hf_config(tmp_path).replace(scan_layers=False))

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(jnp.asarray(TOKENS))))
        return jax.jit(jax.value_and_grad(loss))(params)

    (a, ga), (b, gb) = grads(scanned), grads(unrolled)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    for i in range(scanned.cfg.num_layers):  # gradients reach ~1e3 here: f32 rounding is relative
        want = np.asarray(get_path(gb, layer_path(unrolled.cfg, i)[0] + ("self_attn", "q_proj"))[...])
        prefix, index = layer_path(scanned.cfg, i)
        got = np.asarray(get_path(ga, prefix + ("self_attn", "q_proj"))[...])[index]
        np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-5 * np.abs(want).max())


# (multimodal class, config class, text family, exported class, extra config, vision config)
MULTIMODAL_CASES = {
    "gemma3": (transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config, "gemma3_text",
               "Gemma3ForCausalLM", dict(mm_tokens_per_image=4), dict(image_size=28, patch_size=14)),
    "gemma4": (transformers.Gemma4ForConditionalGeneration, transformers.Gemma4Config, "gemma4_text",
               "Gemma4ForCausalLM", dict(audio_config=None), dict(num_key_value_heads=2, head_dim=16)),
}


@pytest.mark.parametrize("family", sorted(MULTIMODAL_CASES))
def test_multimodal_gemma_loads_its_text_model_and_exports_it(family, tmp_path):
    """A Gemma 3 / Gemma 4 ForConditionalGeneration folder (text under a language_model prefix,
    a vision tower beside it) loads as its text decoder (vision tower and projector unread) with
    the logits transformers gives for text input, and exports a text CausalLM that transformers
    loads with the same logits."""
    mm_class, config_class, text_family, exported, extra_config, vision = MULTIMODAL_CASES[family]
    _, extra = FAMILIES[text_family]
    text = {**COMMON, **extra, "num_hidden_layers": 8} if family == "gemma3" else {**COMMON, **extra}
    config = config_class(
        text_config=text, **extra_config,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           **vision))
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = mm_class(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1.0 if family == "gemma4" else 0.0) + 0.2 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "mm")
    model = load_hf(tmp_path / "mm")
    assert model.cfg.model_type == text_family and model.cfg.layer_types == tuple(config.text_config.layer_types)
    want = hf_logits(hf_model, TOKENS)
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - want).max() < TOL
    save_hf(model, tmp_path / "text")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert type(reloaded).__name__ == exported
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, atol=1e-5)


def test_tied_qwen2_round_trips_without_lm_head(tmp_path):
    src = tmp_path / "src"
    make_hf_model("qwen2").save_pretrained(src)
    save_hf(load_hf(src), tmp_path / "out")
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", framework="np") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_transformers5_config_dialect(tmp_path):
    """A config.json with rope_parameters/dtype (5.x) loads the same as the 4.x spelling."""
    hf_model = make_hf_model("llama3_rope")
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    scaling = cfg.pop("rope_scaling", None) or {}
    theta = cfg.pop("rope_theta", None)
    params = dict(cfg.get("rope_parameters") or {**scaling, "rope_theta": theta})
    cfg["rope_parameters"] = params
    cfg["dtype"] = cfg.pop("torch_dtype", cfg.get("dtype", "float32"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = np.asarray(load_hf(tmp_path)(jnp.asarray(TOKENS)))
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() < TOL


def test_sharded_index_round_trip(tmp_path):
    hf_model = make_hf_model("llama")
    hf_model.save_pretrained(tmp_path / "src")
    save_hf(load_hf(tmp_path / "src"), tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    ours = np.asarray(load_hf(tmp_path / "out")(jnp.asarray(TOKENS)))
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() < TOL
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(hf_model, TOKENS), atol=1e-5)


def test_load_onto_mesh_is_sharded_and_equal(tmp_path):
    hf_model = make_hf_model("qwen3")
    hf_model.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = load_hf(tmp_path, mesh=mesh)
    q = model.layers.self_attn.q_proj[...]  # scanned: [layers, E, H, D]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 32)  # [N, E/2, H/2, D]: never whole
    with jax.set_mesh(mesh):
        ours = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(TOKENS)))
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() < TOL


def _save_and_break(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    _save_and_break(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path)


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
        t["model.layers.0.extra.weight"] = torch.zeros(2)

    _save_and_break(tmp_path, edit)
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path)
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (3, 64)" in str(err.value)
    assert "unexpected tensors: model.layers.0.extra.weight" in str(err.value)


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf(tmp_path)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gemma4_text", "mixtral", "gpt_oss"])
def test_kv_cache_decode_equals_full_forward(family, tmp_path):
    make_hf_model(family).save_pretrained(tmp_path)  # sliding window 5 < 16 exercised too
    model = load_hf(tmp_path)
    tokens = jnp.asarray(TOKENS)
    full = np.asarray(model(tokens))
    cache = init_cache(model.cfg, batch_size=2, max_length=16)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    segments = jnp.ones((2, 16), jnp.int32)
    prefill, cache = model(tokens[:, :10], positions[:, :10], segments[:, :10], cache=cache, cache_index=0)
    steps = [prefill]
    for t in range(10, 16):
        logits, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1],
                              cache=cache, cache_index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full, atol=1e-5)


def test_save_hf_in_bfloat16(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "src")
    save_hf(load_hf(tmp_path / "src"), tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_hf(tmp_path / "bf16")
    assert reloaded.embed_tokens[...].dtype == jnp.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16

