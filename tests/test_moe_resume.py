"""A mixture-of-experts run whose routing state changes every step (DeepSeek-V3's selection
biases moved by `train.router_bias_update_rate`, the z-loss and load-balancing loss on) resumes
from its checkpoint exactly as if it had not stopped, and exports the moved biases."""

from __future__ import annotations

import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.io.metrics import read_metrics
from jaxft.models import load_hf
from jaxft.run import run
from tests.quickstart_subset import sft_data
from tests.test_families import RUN


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    """A tiny random DeepSeek-V3 (sigmoid routing with a selection bias, 8 experts in 4 groups,
    layer 0 dense) with the bundled tokenizer, as an HF folder."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, save_hf
    from jaxft.models.config import ModelConfig

    tok = load_bundled_tokenizer()
    cfg = ModelConfig(
        model_type="deepseek_v3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=3,
        num_heads=2, num_kv_heads=2, head_dim=8, kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, num_experts=8, experts_per_token=2, moe_intermediate_size=16,
        dense_layers=(0,), router_scoring="sigmoid", router_groups=4, router_topk_groups=2, router_bias=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_hf(create_model(cfg, seed=5), tmp_path_factory.mktemp("deepseek") / "hf", tokenizer=tok)


def test_a_resumed_moe_run_with_bias_updates_equals_the_uninterrupted_one(deepseek_folder, tmp_path):
    overrides = {**RUN, **sft_data(tmp_path, 64), "data.eval": "", "model.path": str(deepseek_folder),
                 "optim.lr": 3e-3, "train.save_every": 3, "train.router_bias_update_rate": 0.01,
                 "train.router_aux_loss_coef": 0.01, "train.router_z_loss_coef": 0.001}
    whole = run(config_lib.load("configs/sft.py:tiny", overrides), tmp_path / "whole")
    run(config_lib.load("configs/sft.py:tiny", {**overrides, "train.steps": 3}), tmp_path / "parts", export=False)
    resumed = run(config_lib.load("configs/sft.py:tiny", overrides), tmp_path / "parts")
    assert resumed.step == 6
    ours, ref = ([r for r in read_metrics(w) if "loss" in r] for w in (tmp_path / "parts", whole.workdir))
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, 7))
    for key in ("loss", "moe/aux_loss", "moe/z_loss", "moe/load_max_over_mean"):
        assert max(abs(a[key] - b[key]) for a, b in zip(ours, ref)) <= 1e-6, key
    bias = lambda folder: np.asarray(load_hf(folder).groups[1][0].mlp.e_score_correction_bias[...])
    np.testing.assert_allclose(bias(resumed.export_dir), bias(whole.export_dir), atol=1e-7)
    moved = bias(whole.export_dir) - bias(deepseek_folder)
    assert np.abs(moved).max() > 0.005  # six steps of +-0.01 (0 where an expert sat at the mean)
