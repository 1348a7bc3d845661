"""The families beyond Llama: LoRA on Gemma exports a PEFT adapter that `peft` loads with equal
logits; LoRA on Phi-3's fused projections is refused up front, naming the key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import load_hf
from jaxft.models.adapters import init_adapters
from jaxft.models.lora import PROJECTIONS, LoRASpec
from jaxft.models.peft import save_peft
from jaxft.parallel import sharding
from tests.hf_reference import hf_logits, make_hf_model

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


def test_gemma3_lora_exports_a_peft_adapter_that_peft_loads_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf_model = make_hf_model("gemma3_text")
    hf_model.save_pretrained(tmp_path / "base")
    base = load_hf(tmp_path / "base")
    cfg = base.cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    mesh = sharding.make_mesh(data=-1)
    graphdef, adapters = init_adapters(cfg, seed=3, mesh=mesh)
    leaves, tree = jax.tree.flatten(adapters)  # trained adapters: B off zero
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    _, base_params = nnx.split(base, nnx.Param)
    ours = np.asarray(nnx.merge(graphdef, adapters, base_params)(jnp.asarray(TOKENS)))
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() > 1e-2  # the adapters do something
    save_peft(cfg, adapters, tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    assert np.abs(ours - hf_logits(model, TOKENS)).max() < 1e-4


def test_lora_on_phi3_fused_projections_is_refused_naming_the_key(tmp_path):
    make_hf_model("phi3").save_pretrained(tmp_path)
    cfg = load_hf(tmp_path).cfg
    with pytest.raises(ConfigError, match=r"lora\.targets: phi3 checkpoints fuse gate_proj, k_proj, q_proj, up_proj, v_proj into gate_up_proj, qkv_proj"):
        cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=("o_proj", "down_proj")))  # unfused: fine
