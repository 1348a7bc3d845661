"""Qwen3.5 (dense and MoE): Gated DeltaNet layers interleaved with gated full attention.

Logits equal transformers' Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM on tiny random float32
checkpoints (rows of 40 tokens = 5 chunks of 8), a packed row equals its rows alone, the HF
folder round trip (and the released checkpoints' nested config and tensor names), greedy
generation equals transformers' greedy generate (left-padded prompts of different lengths),
LoRA on the linear-attention projections exports a PEFT adapter that PEFT loads, SFT of the
MoE variant learns, and context parallelism (tokens split over mesh.sequence) equals one device."""

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
from jaxft.models.config import LayerGroup, config_from_hf, config_to_hf
from tests.hf_reference import hf_logits

V = 97
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 40))
CHUNK = 8  # 40-token rows: 5 chunks of the chunked delta rule
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)


def make_hf(moe: bool, layers: int, seed: int = 0, **extra):
    """A random fp32 transformers Qwen3.5 (8 layers: the 3 linear + 1 full pattern twice); norms,
    dt_bias and A_log randomised so a misplaced one shows."""
    cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    config = cls(**{**TINY, **(MOE if moe else {}), "num_hidden_layers": layers, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):  # stored as itself (ones)
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.weight"):  # (1 + w) norms: an offset from 1
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith(("dt_bias", "A_log")):
                p.copy_(0.5 * torch.randn_like(p))
            elif "linear_attn" in name or "self_attn" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """(folder, transformers model, jaxft model with chunk 8) of an 8-layer dense Qwen3.5."""
    path = tmp_path_factory.mktemp("qwen3_5")
    hf = make_hf(False, 8)
    hf.save_pretrained(path)
    return path, hf, _with_chunk(load_hf(path))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_5_moe")
    hf = make_hf(True, 4)
    hf.save_pretrained(path)
    return path, hf, _with_chunk(load_hf(path))


def _with_chunk(model, chunk=CHUNK):
    """The same weights under a config with the delta rule's chunk `chunk`."""
    from jaxft.models.hf import abstract_model

    _, state = nnx.split(model)
    new_graphdef, _ = nnx.split(abstract_model(model.cfg.replace(linear_chunk_size=chunk)))
    return nnx.merge(new_graphdef, state)


def test_dense_logits_equal_transformers_and_the_pattern_is_one_scanned_group(dense):
    path, hf, model = dense
    cfg = model.cfg
    assert cfg.model_type == "qwen3_5_text" and cfg.partial_rotary_factor == 0.25 and cfg.attn_output_gate
    assert cfg.layer_groups() == (LayerGroup(start=0, period=4, repeats=2),)  # compile time independent of depth
    diff = np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max()
    print(f"qwen3_5 dense max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    unrolled = load_hf(path)  # unrolled, gated_deltanet's default chunk: the same numbers
    unrolled_cfg = unrolled.cfg.replace(scan_layers=False)
    from jaxft.models.hf import load_weights

    graphdef, state = nnx.split(load_weights(path, unrolled_cfg))
    flat = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(TOKENS))  # op by op: 3x the time
    assert np.abs(np.asarray(flat) - hf_logits(hf, TOKENS)).max() < 1e-4


def test_moe_logits_equal_transformers(moe):
    _, hf, model = moe
    cfg = model.cfg
    assert cfg.num_experts == 4 and cfg.shared_expert_gate and cfg.norm_topk_prob and cfg.expert_size == 24
    diff = np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max()
    print(f"qwen3_5_moe max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_a_packed_row_equals_its_rows_alone_and_padding_never_leaks(dense):
    """Two examples (23 and 13 tokens) and 4 padding tokens packed in one row: each example's
    logits equal the example run alone (the conv window and the recurrent state reset at the
    boundary); changing the padding's tokens changes nothing."""
    _, _, model = dense
    a, b = TOKENS[0, :23], TOKENS[1, :13]
    row = np.concatenate([a, b, [5, 6, 7, 8]])[None]
    segments = np.array([[1] * 23 + [2] * 13 + [0] * 4], np.int32)
    positions = np.concatenate([np.arange(23), np.arange(13), np.zeros(4, int)])[None].astype(np.int32)
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments)))
    alone_a = np.asarray(model(jnp.asarray(a[None])))
    alone_b = np.asarray(model(jnp.asarray(b[None])))
    np.testing.assert_allclose(packed[0, :23], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 23:36], alone_b[0], atol=1e-5)
    other = row.copy()
    other[0, 36:] = [50, 60, 70, 80]
    again = np.asarray(model(jnp.asarray(other), jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(again[0, :36], packed[0, :36], atol=1e-6)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_hf_round_trip(variant, dense, moe, tmp_path):
    """save_hf writes a folder transformers loads as the same architecture with jaxft's
    logits; its config.json reads back to the same ModelConfig."""
    path, hf, model = dense if variant == "dense" else moe
    out = save_hf(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(reloaded).__name__ == ("Qwen3_5ForCausalLM" if variant == "dense" else "Qwen3_5MoeForCausalLM")
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS), atol=1e-5)
    saved = json.loads((out / "config.json").read_text())
    assert config_from_hf(saved) == config_from_hf(json.loads((path / "config.json").read_text()))
    assert config_from_hf(config_to_hf(model.cfg)) == model.cfg.replace(linear_chunk_size=None)


def test_released_checkpoint_layout_loads_as_its_text_model(dense, tmp_path):
    """A Qwen3_5ForConditionalGeneration-style folder (model_type qwen3_5, the text config nested
    under text_config, tensors under model.language_model., a vision tower and an mtp head that
    are not read) loads to the text model's logits."""
    from safetensors.numpy import load_file, save_file

    path, hf, _ = dense
    tensors = load_file(path / "model.safetensors")
    nested = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
              for k, v in tensors.items()}
    nested["model.visual.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    nested["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    tmp_path.mkdir(exist_ok=True)
    save_file(nested, tmp_path / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((path / "config.json").read_text())
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True, "mrope_section": [11, 11, 10]}
    outer = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
             "vision_config": {"depth": 1}, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(outer))
    model = load_hf(tmp_path)
    assert model.cfg.model_type == "qwen3_5_text" and model.cfg.rope_scaling is None
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS)).max() < 1e-4


def test_greedy_generation_equals_transformers_greedy(dense):
    """Two prompts of different lengths decoded together (the shorter left-padded: the padding
    never reaches the conv window or the state), 12 new tokens each: transformers' greedy
    generate of each prompt alone (prefill: the chunked rule; decode: the recurrence)."""
    from jaxft.inference import generate as gen

    _, hf, model = dense
    prompts = [list(TOKENS[0, :11]), list(TOKENS[1, :5])]
    got = gen.generate(model, prompts, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    for prompt, ours in zip(prompts, got):
        ids = torch.tensor([prompt])  # an explicit mask: transformers would mask a prompt token equal to the pad id
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == want


def test_lora_on_the_linear_projections_exports_a_peft_adapter_that_peft_loads(moe, tmp_path):
    """Adapters on every projection of the MoE model (the Gated DeltaNet layers' in_proj_qkv /
    z / b / a and out_proj, the gated q_proj, the routed and shared experts): PEFT's model
    with the exported folder gives jaxft's logits, and the folder reads back exactly."""
    peft = pytest.importorskip("peft")
    from jaxft.models.adapters import init_adapters
    from jaxft.models.lora import PROJECTIONS, LoRASpec
    from jaxft.models.peft import load_peft, save_peft
    from jaxft.parallel import sharding

    path, hf, base = moe
    cfg = base.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    mesh = sharding.make_mesh(data=-1)
    graphdef, adapters = init_adapters(cfg, seed=3, mesh=mesh)
    assert "in_proj_qkv_lora_a" in adapters["groups"][0][0]["linear_attn"]
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    _, base_params = nnx.split(base, nnx.Param)
    ours = np.asarray(jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(jnp.asarray(TOKENS)))(adapters, base_params))
    assert np.abs(ours - hf_logits(hf, TOKENS)).max() > 1e-2
    out = save_peft(cfg, adapters, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj"} <= set(config["target_modules"])
    fresh = make_hf(True, 4)  # PeftModel wraps its base in place
    model = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4
    back = load_peft(out, cfg, mesh)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)))


def test_context_parallelism_equals_one_device(dense):
    """Tokens split over mesh.sequence = 4 (rows over data = 2): each shard runs the linear
    layers' conv and rule on its own tokens and hands the state on (`linear_context_parallel`);
    logits and every gradient equal one device's, with packed segments crossing the shard
    borders (10 tokens a shard), one starting exactly at a border, a padding gap across a border
    that its segment continues after, and shards of padding only."""
    from flax import nnx

    from jaxft.parallel import sharding

    _, _, model = dense
    tokens = jnp.asarray(np.concatenate([TOKENS, TOKENS]))  # [4, 40]
    rows = np.asarray([[1] * 13 + [2] * 17 + [3] * 10, [1] * 13 + [2] * 17 + [3] * 10,
                       [1] * 8 + [0] * 4 + [1] * 8 + [2] * 20, [1] * 18 + [0] * 22])
    segments = jnp.asarray(rows)
    positions = np.zeros_like(rows)
    for r, row in enumerate(rows):
        for t in range(1, 40):
            positions[r, t] = 0 if row[t] == 0 else (positions[r, t - 1] + 1 if row[t] == row[t - 1] else 0)
    positions = jnp.asarray(positions)
    weights = np.random.default_rng(4).normal(size=(4, 40, V)) * (rows != 0)[..., None]  # padding queries: any value
    weights = jnp.asarray(weights, jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grads(params, rest):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(tokens, positions, segments)
            return jnp.sum(logits * weights)

        return jax.value_and_grad(loss)(params)

    want = loss_and_grads(params, rest)
    with jax.set_mesh(sharding.make_mesh(data=2, sequence=4)):
        assert sharding.splits("act_length")
        got = loss_and_grads(params, rest)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))  # sums split over shards


@pytest.mark.parametrize("remat", ["full", "none"])
def test_context_parallel_shards_recompute_their_rule_when_layers_are_rematerialised(remat, monkeypatch):
    """Under a remat policy the shard's conv and rule run under their own `jax.checkpoint` (on
    TPU the layer's remat alone kept their width-(V + K) intermediates: Qwen3.5-0.8B at 4 x 4,096
    tokens on v5p-8, sequence 2, planned 5.64 GiB a chip against 4.59 with it); model.remat=none
    keeps them (no recompute the user did not ask for)."""
    import dataclasses

    from jaxft.models import create_model, linear_context_parallel
    from jaxft.parallel import sharding

    seen = []
    real = linear_context_parallel.conv_and_rule

    def spy(*args, **kwargs):
        seen.append(kwargs["recompute"])
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_context_parallel, "conv_and_rule", spy)
    cfg = dataclasses.replace(config_from_hf({"model_type": "qwen3_5_text", **TINY, "num_hidden_layers": 4}),
                              remat=remat, scan_layers=False)
    model = create_model(cfg, seed=0)
    tokens = jnp.zeros((2, 16), jnp.int32)
    def remats(recompute):  # checkpoints in one layer's shard_map: the rule's own per chunk, + the body's
        args = (jnp.ones((2, 16, 32)), jnp.ones((4, 32)), -jnp.ones((2, 16, 2)), jnp.full((2, 16, 2), 0.5),
                jnp.ones((2, 16), jnp.int32))
        return str(jax.make_jaxpr(lambda: real(*args, key_heads=1, key_dim=8, value_dim=8, chunk_size=4,
                                               recompute=recompute))()).count("remat")

    with jax.set_mesh(sharding.make_mesh(data=4, sequence=2)):
        jaxpr = str(jax.make_jaxpr(lambda: model(tokens))())
        body = {recompute: remats(recompute) for recompute in (True, False)}
    assert seen == [remat != "none"] * 3 and "shard_map" in jaxpr
    assert body[True] == body[False] + 1


def _tiny_folder(tmp_path, moe: bool):
    """A tiny random Qwen3.5 HF folder with the bundled tokenizer (jaxft's init); the vocabulary
    has room for the <|endoftext|> that transformers' Qwen3.5 tokenizer class adds on reading it."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model

    tok = load_bundled_tokenizer()
    hf_config = {"model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", **TINY, **(MOE if moe else {}),
                 "vocab_size": len(tok) + 8, "num_hidden_layers": 4, "bos_token_id": tok.bos_token_id,
                 "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "torch_dtype": "float32",
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}
    return save_hf(create_model(config_from_hf(hf_config), seed=7), tmp_path / "hf", tokenizer=tok)


def test_moe_sft_learns_and_its_export_loads_in_transformers_with_equal_logits(tmp_path):
    """One training run for the family: the MoE variant (its Gated DeltaNet layers, gated
    attention, routed and shared experts all trained) learns and exports a folder transformers
    loads as Qwen3_5MoeForCausalLM with jaxft's logits. The dense variant's layers are a subset."""
    from tests.test_families import sft_learns_and_exports

    sft_learns_and_exports(_tiny_folder(tmp_path, moe=True), tmp_path, "Qwen3_5MoeForCausalLM")


def test_dense_dpo_starts_at_ln2_and_learns(tmp_path):
    """DPO on the dense variant: the reference forward runs the same linear-attention layers (pairs
    are two rows each, their states independent), so the first loss is ln 2, and it learns."""
    from tests.test_families import dpo_starts_at_ln2_and_learns

    dpo_starts_at_ln2_and_learns(_tiny_folder(tmp_path, moe=False), tmp_path)


@pytest.mark.parametrize("name", ["qwen3_5_0_8b", "qwen3_5_35b_a3b", "qwen3_5_bench"])
def test_presets_count_the_params_transformers_builds_and_scan_one_group(name):
    """The presets' parameter count (ModelConfig.num_params, for `jaxft plan`) equals the model
    transformers builds from their config.json (on the meta device) and jaxft's own shapes; the
    3 linear + 1 full pattern is one scanned group whatever the depth."""
    from jaxft.models import abstract_model, get_preset

    cfg = get_preset(name)
    hf = config_to_hf(cfg)
    hf.pop("architectures")
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    want = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == want
    shapes = nnx.state(abstract_model(cfg.with_layers(8)), nnx.Param)
    assert cfg.with_layers(8).num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    deep = cfg if cfg.num_layers >= 8 else cfg.with_layers(8)  # the bench's 4 layers scan as 3 + 1
    assert deep.layer_groups() == (LayerGroup(0, 4, deep.num_layers // 4),)


def test_qlora_base_quantizes_the_linear_projections_and_stays_close(dense):
    """QLoRA (int8) on Qwen3.5: the Gated DeltaNet layers' projections stored as codes (the conv,
    A_log, dt_bias and norms full precision), fresh adapters: the logits within 3% of the base's
    (docs/lora.md's int8 tolerance)."""
    from jaxft.models.adapters import init_adapters
    from jaxft.models.from_config import split_params
    from jaxft.models.lora import PROJECTIONS, LoRASpec
    from jaxft.models.quantize import QuantizedKernel, quantize_base, quantized_shardings
    from jaxft.parallel import sharding

    from jaxft.models import create_model

    mesh = sharding.make_mesh(data=-1)
    # jaxft's init (std 0.02): the parity checkpoint's large random weights make a chaotic model
    # (0.4% weight noise moves its logits ~19%)
    base_model = create_model(dense[2].cfg, seed=0, mesh=mesh)
    cfg = base_model.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    tokens = jnp.asarray(TOKENS)
    with jax.set_mesh(mesh):
        base_graphdef, base = split_params(base_model)
        graphdef, adapters = init_adapters(cfg, seed=1, mesh=mesh)
        quantized = quantize_base(cfg, base, "int8", quantized_shardings(
            cfg, base, jax.tree.map(lambda x: x.sharding, base), "int8", mesh))
        linear = quantized["groups"][0][0]["linear_attn"]
        assert all(isinstance(linear[n], QuantizedKernel) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"))
        assert not any(isinstance(linear[n], QuantizedKernel) for n in ("conv1d", "A_log", "dt_bias", "norm_weight"))
        full = jax.jit(lambda b: nnx.merge(base_graphdef, b)(tokens))(base)
        ours = jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(tokens))(adapters, quantized)
    rel = float(jnp.sqrt(jnp.mean((ours - full) ** 2)) / jnp.sqrt(jnp.mean(full ** 2)))
    assert 0 < rel <= 0.03, rel


def test_moe_on_an_fsdp_expert_tensor_mesh_equals_one_device(moe):
    """The MoE variant sharded over FSDP, expert and tensor axes (experts split over the expert
    axis, the linear layers' kernels over FSDP) on packed rows: the loss and the gradients of a
    linear layer's projections and of the experts equal one device's (to 1e-4 of the largest:
    the chaotic parity checkpoint amplifies summation order)."""
    from tests.test_families import assert_mesh_equals_one_device

    path, _, _ = moe

    def picks(grads, cfg):
        group = grads["groups"][0][0]
        return [group["linear_attn"]["in_proj_qkv"][...], group["linear_attn"]["A_log"][...],
                group["mlp"]["gate_proj"][...]]

    assert_mesh_equals_one_device(path, dict(data=1, fsdp=2, expert=2, tensor=2), picks, atol_scale=1e-4)


def test_model_linear_chunk_size_is_the_chunk_every_linear_layer_runs(dense, monkeypatch):
    """--config.model.linear_chunk_size reaches the model config (0 = gated_deltanet's default) and
    the layers run the rule at their config's chunk."""
    from pathlib import Path

    import jaxft.config
    from jaxft.models import gated_deltanet
    from jaxft.perf import plan as plan_lib

    sft = str(Path(__file__).resolve().parents[1] / "configs/sft.py:tiny")
    for value, chunk in ((64, 64), (0, None)):
        config = jaxft.config.load(sft, {"model.preset": "qwen3_5_0_8b", "model.linear_chunk_size": value})
        assert plan_lib.plan_model_config(config).linear_chunk_size == chunk
    chunks, rule = [], gated_deltanet.gated_delta_rule

    def recording(*args, chunk_size, **kwargs):
        chunks.append(chunk_size)
        return rule(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(gated_deltanet, "gated_delta_rule", recording)
    _, _, model = dense  # its config's chunk: CHUNK
    model(jnp.asarray(TOKENS[:, :12]))
    assert chunks and set(chunks) == {CHUNK}
