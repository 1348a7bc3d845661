"""QLoRA: a frozen base stored as int8 or NF4 codes, de-quantized per matmul. The rounding is
the nearest level, a quantized base's logits stay within docs/lora.md's tolerance of the full
base, a QLoRA run trains and merges into the full-precision base, and `jaxft plan` counts
the packed base."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import config as config_lib, run as run_lib
from jaxft.perf import plan as plan_lib
from jaxft.data.assets import quickstart_file
from jaxft.io.export import export_checkpoint
from jaxft.io.metrics import read_metrics
from jaxft.models import create_model, load_hf, save_hf
from jaxft.models.adapters import init_adapters
from jaxft.models.from_config import split_params
from jaxft.models.quantize import NF4_LEVELS, QuantizedKernel, quantize_base, quantize_kernel, quantized_shardings
from jaxft.parallel import sharding
from tests.quickstart_subset import quickstart_head
from tests.test_lora import lora_of, tiny_cfg, tokens_of

REPO = Path(__file__).resolve().parents[1]
# docs/lora.md, "QLoRA": RMS error of the logits relative to their RMS, tiny random model.
LOGIT_TOLERANCE = {"int8": 0.03, "nf4": 0.30}


def test_nf4_rounds_each_weight_to_its_nearest_level_and_int8_per_output_channel():
    x = jax.random.normal(jax.random.key(0), (3, 256, 96))  # [layers, in, out]
    q = quantize_kernel(x, "nf4", 1, 1)
    assert q.codes.dtype == jnp.uint4 and q.scale.shape == (3, 4, 96)  # blocks of 64 along "in"
    blocks = x.reshape(3, 4, 64, 96)
    absmax = jnp.abs(blocks).max(axis=2, keepdims=True)
    nearest = jnp.argmin(jnp.abs((blocks / absmax)[..., None] - jnp.asarray(NF4_LEVELS).reshape(1, 1, 1, 1, 16)), axis=-1)
    assert np.array_equal(np.asarray(q.codes.astype(jnp.int32)), np.asarray(nearest.reshape(x.shape)))
    err = float(jnp.sqrt(jnp.mean((q.dequantize(jnp.float32) - x) ** 2)))
    assert 0.05 < err < 0.12  # NF4 on Gaussian weights: ~9% RMS
    q8 = quantize_kernel(x, "int8", 1, 1)
    assert q8.codes.dtype == jnp.int8 and q8.scale.shape == (3, 1, 96)
    assert float(jnp.abs(q8.dequantize(jnp.float32) - x).max()) <= float(q8.scale.max()) / 2 + 1e-6


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_base_stays_within_the_documented_logit_tolerance(kind):
    cfg, _ = tiny_cfg(hidden_size=128, intermediate_size=256)
    lcfg = lora_of(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        base_graphdef, base = split_params(create_model(cfg, seed=0, mesh=mesh))
        graphdef, adapters = init_adapters(lcfg, seed=1, mesh=mesh)
        shardings = quantized_shardings(lcfg, base, jax.tree.map(lambda x: x.sharding, base), kind, mesh)
        quantized = quantize_base(lcfg, base, kind, shardings)
        kernel = quantized["layers"]["mlp"]["up_proj"]
        assert isinstance(kernel, QuantizedKernel) and kernel.codes.sharding.spec == shardings["layers"]["mlp"]["up_proj"].codes.spec
        tokens = tokens_of(cfg)
        full = nnx.merge(base_graphdef, base)(tokens)
        ours = jax.jit(lambda a, b: nnx.merge(graphdef, a, b)(tokens))(adapters, quantized)
        rel = float(jnp.sqrt(jnp.mean((ours - full) ** 2)) / jnp.sqrt(jnp.mean(full ** 2)))
        print(f"{kind}: logits RMS error {rel:.4f} of their RMS")
        assert 0 < rel <= LOGIT_TOLERANCE[kind]


def test_a_qlora_run_trains_adapters_on_unchanged_codes_and_merges_into_the_full_base(tmp_path):
    cfg, tok = tiny_cfg()
    base_folder = save_hf(create_model(cfg, seed=7), tmp_path / "base", tokenizer=tok)
    train = quickstart_head(tmp_path, "sft_train.jsonl", 96)
    config = config_lib.load(f"{REPO}/configs/sft.py:tiny", {
        "model.path": str(base_folder), "model.preset": "", "data.train": str(train), "data.eval": "",
        "train.steps": 6, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
        "train.log_every": 1, "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.lr": 5e-3,
        "lora.rank": 4, "lora.alpha": 8.0, "lora.base_quantization": "nf4"})
    result = run_lib.run(config, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(result.workdir) if "loss" in r]
    assert losses[-1] < losses[0]
    assert result.export_dir is None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    merged = export_checkpoint(result.workdir, tmp_path / "merged", kind="merge")  # full-precision base
    tokens = tokens_of(cfg)
    plain = np.asarray(load_hf(base_folder)(tokens))
    assert np.abs(np.asarray(load_hf(merged)(tokens)) - plain).max() > 1e-4  # the adapters are in


def test_a_bad_quantization_names_the_key():
    config = config_lib.load(f"{REPO}/configs/sft.py:tiny", {"lora.rank": 4, "lora.base_quantization": "int4"})
    with pytest.raises(ValueError, match=r"lora\.base_quantization"):
        config_lib.validate(config)
    config = config_lib.load(f"{REPO}/configs/sft.py:tiny", {"lora.base_quantization": "nf4"})
    with pytest.raises(ValueError, match=r"lora\.rank"):
        config_lib.validate(config)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_plan_counts_a_packed_nf4_base_smaller_than_int8_and_bf16():
    sizes = {}
    for kind in ("none", "int8", "nf4"):
        config = config_lib.load(f"{REPO}/configs/sft.py:tiny", {
            "lora.rank": 4, "lora.base_quantization": kind, "model.dtype": "bfloat16",
            "model.compute_dtype": "bfloat16", "train.batch_size": 4})
        r = plan_lib.plan(config, target="v5e-1")
        assert r.fits and r.frozen_bytes > 0 and r.settings["base_quantization"] == kind
        text = plan_lib.format_plan(r)
        assert "frozen base" in text and "full fine-tuning of this model would hold" in text
        sizes[kind] = r.frozen_bytes
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_sft_steps_on_a_quantized_base_leave_its_codes_and_scales_bit_identical():
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.data.pipeline import make_eval_batches
    from jaxft.parallel.batches import to_global
    from jaxft.steps.common import jit_step
    from jaxft.steps.optimizer import make_optimizer
    from jaxft.steps.sft import make_sft_step
    from jaxft.steps.state import create_train_state

    cfg, _ = tiny_cfg()
    lcfg = lora_of(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    with jax.set_mesh(mesh):
        _, base = split_params(create_model(cfg, seed=0, mesh=mesh))
        graphdef, adapters = init_adapters(lcfg, seed=1, mesh=mesh)
        shardings = quantized_shardings(lcfg, base, jax.tree.map(lambda x: x.sharding, base), "nf4", mesh)
        frozen = quantize_base(lcfg, base, "nf4", shardings)
        before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
        tx, schedule = make_optimizer(lr=1e-2, schedule="constant", total_steps=10)
        state, state_sh = create_train_state(adapters, tx, mesh)
        step = jit_step(make_sft_step(graphdef, tx, schedule), state_shardings=state_sh,
                        batch_sharding=sharding.batch_sharding(mesh), frozen_shardings=shardings)
        batches = make_eval_batches(str(quickstart_file("sft_train.jsonl")), load_bundled_tokenizer(), kind="sft",
                                    batch_size=8, max_length=64, packing=True)
        for _, b in zip(range(3), batches):
            batch = {k: v for k, v in to_global(b, mesh).items() if k in ("tokens", "positions", "segment_ids", "loss_mask")}
            state, m = step(state, batch, frozen)
        assert np.isfinite(float(m["loss"]))
        for a, b in zip(before, jax.tree.leaves(frozen)):
            assert np.array_equal(a, np.asarray(b))


def test_loading_quantizes_each_kernel_as_it_arrives(tmp_path):
    from jaxft.models import load_weights
    from jaxft.models.quantize import quantizer

    cfg, tok = tiny_cfg()
    folder = save_hf(create_model(cfg, seed=3), tmp_path / "hf", tokenizer=tok)
    seen = []
    quantize = quantizer(lora_of(cfg), "int8")

    def transform(path, x):
        seen.append(path)
        return quantize(path, x)

    _, params = split_params(load_weights(folder, cfg, transform=transform))
    mlp = params["layers"]["mlp"]
    assert isinstance(mlp["up_proj"], QuantizedKernel) and mlp["up_proj"].codes.dtype == jnp.int8
    assert not isinstance(params["embed_tokens"], QuantizedKernel)  # embeddings stay as they are
    assert len(seen) == len(set(seen))  # each tensor once, as it is loaded
