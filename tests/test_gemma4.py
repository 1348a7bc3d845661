"""Gemma 4 (dense text) beyond parity (tests/test_models_parity.py; its PEFT export is in
tests/test_families.py): layer groups and specs, SFT and DPO
runs from an HF folder (the layer scalars stay the checkpoint's), every mesh equals one device,
and the greedy sampler equals transformers'."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)

from jaxft.models import load_hf
from jaxft.models.layer_groups import layer_path
from jaxft.models.paths import get_path
from tests.hf_reference import hf_logits, make_hf_model
from tests.test_families import RUN

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4")
    model = make_hf_model("gemma4_text")
    model.save_pretrained(folder)
    return folder, model


def test_layer_groups_scan_the_pattern_and_keep_shared_kv_producers_alone(gemma4):
    cfg = load_hf(gemma4[0]).cfg
    groups = cfg.layer_groups()
    assert (groups[0].period, groups[0].repeats) == (3, 2)  # (sliding, sliding, full) twice
    specs = cfg.layer_specs()
    producers = [i for i, s in enumerate(specs) if s.keeps_kv]
    assert producers == [7, 8] and [s.kv_from for s in specs[9:]] == [7, 7, 8]
    assert all(g.repeats == 1 for g in groups if g.start in producers)
    assert specs[2].head_dim == 32 and specs[2].kv_heads == 1 and specs[2].values_from_keys
    assert specs[9].mlp_size == 2 * cfg.intermediate_size


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, tensor=2), dict(data=2, sequence=4)],
                         ids=["fsdp-tensor", "context-parallel"])
def test_gemma4_on_a_mesh_equals_one_device(gemma4, axes):
    """Layers of two shapes, shared keys and values and per-layer inputs sharded over FSDP and
    tensor axes, and split over a sequence axis: the loss and gradients of one device, on packed rows.
    f32 sums in another order (Gemma 4's unscaled, sharp attention scores magnify them): errors
    relative to each gradient's scale."""
    from tests.test_families import assert_mesh_equals_one_device

    def picks(grads, cfg):
        prefix, index = layer_path(cfg, 2)  # a full layer (its own head dim, k = v)
        return [get_path(grads, prefix + ("self_attn", "k_proj"))[...][index], grads["embed_tokens_per_layer"][...]]

    assert_mesh_equals_one_device(gemma4[0], axes, picks, atol_scale=5e-4)


def test_greedy_generation_equals_transformers(gemma4):
    """A 12-token prompt (past the window of 5) decoded 6 tokens through the KV cache: sliding
    and full layers' own caches, shared layers reading theirs."""
    from jaxft.inference import generate as gen

    folder, hf_model = gemma4
    prompt = [int(t) for t in TOKENS[0, :12]]
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.generate(load_hf(folder), [prompt], max_new_tokens=6, eos_token_id=[], pad_token_id=0) == [want]


# --- a tiny Gemma 4 trained as users train it: SFT and DPO from its HF folder ------------------


@pytest.fixture(scope="module")
def gemma4_folder(tmp_path_factory):
    """A tiny random Gemma 4 with the bundled tokenizer (full layers of their own head dim with
    k = v, per-layer inputs, the last 2 layers on shared keys and values, window 16 < 64-token rows)."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, save_hf
    from jaxft.models.config import ModelConfig

    tok = load_bundled_tokenizer()
    cfg = ModelConfig(
        model_type="gemma4_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=6,
        num_heads=4, num_kv_heads=2, head_dim=16, global_head_dim=32, global_kv_heads=1, attention_k_eq_v=True,
        rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
        local_rope_theta=1e4, norm="rms_f32", sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
        qk_norm=True, v_norm=True, layer_scalar=True, query_pre_attn_scalar=1.0, per_layer_input_size=8,
        num_kv_shared_layers=2, sliding_window=16,
        layer_types=("sliding_attention", "sliding_attention", "full_attention") * 2,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return save_hf(create_model(cfg, seed=7), tmp_path_factory.mktemp("gemma4") / "hf", tokenizer=tok)


def test_gemma4_sft_learns_keeps_its_layer_scalars_and_exports_to_transformers(gemma4_folder, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    from jaxft import config as config_lib
    from jaxft.io.metrics import read_metrics
    from jaxft.run import run
    from tests.quickstart_subset import sft_data

    scalars = {k: v for k, v in load_file(gemma4_folder / "model.safetensors").items() if k.endswith("layer_scalar")}
    config = config_lib.load("configs/sft.py:tiny", {**RUN, **sft_data(tmp_path, 64), "data.eval": "",
                                                     "model.path": str(gemma4_folder), "optim.lr": 3e-3,
                                                     "optim.weight_decay": 0.1})
    result = run(config, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(result.workdir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    exported = load_file(result.export_dir / "model.safetensors")
    assert len(scalars) == 6 and all(np.array_equal(exported[k], v) for k, v in scalars.items())
    ours = np.asarray(load_hf(result.export_dir)(jnp.asarray(TOKENS)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir, attn_implementation="eager")
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    assert np.abs(ours - hf_logits(hf, TOKENS)).max() < 1e-4


def test_gemma4_lora_dpo_starts_at_ln2_and_learns(gemma4_folder, tmp_path):
    from tests.test_families import dpo_starts_at_ln2_and_learns

    dpo_starts_at_ln2_and_learns(gemma4_folder, tmp_path, **{
        "optim.lr": 1e-2, "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "all-linear"})
