"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) beyond parity
(tests/test_models_parity.py): dropless routing whatever the imbalance, meshes equal one device,
per-expert LoRA adapters run in the grouped matmuls (the PEFT export: tests/test_families.py),
and an SFT run from an HF folder learns and exports a folder transformers loads with equal
logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import load_hf
from jaxft.models.lora import LoRASpec
from jaxft.models.grouped_matmul import block_rows, block_size
from jaxft.models.moe import dropless_experts, route
from tests.hf_reference import make_hf_model

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


def _naive_experts(x, weights, experts, gate, up, down):
    """Each token's k experts one by one (transformers' loop), in float64."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            h = np.asarray(jax.nn.silu(x[t] @ gate[e])) * (x[t] @ up[e])
            out[t] += float(weights[t, k]) * (h @ down[e])
    return out


@pytest.mark.parametrize("matmul", ["ragged", "blocks"])
@pytest.mark.parametrize("routing", ["balanced", "all_to_one", "one_empty"])
def test_dropless_experts_compute_every_token_and_expert(routing, matmul):
    """Every (token, expert) pair runs whatever the imbalance (no capacity, no dropped token):
    all 24 tokens routed to expert 2 (with k=2, to experts 2 and 0), or expert 3 getting none;
    in both grouped-matmul layouts (blocks: 8-row blocks, groups of 0 to 24 rows padded), whose
    gradients equal the per-token loop's."""
    T, E, F, X, K = 24, 8, 12, 4, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, E))
    gate, up = (jax.random.normal(k, (X, E, F)) / 3 for k in keys[1:3])
    down = jax.random.normal(keys[3], (X, F, E)) / 3
    logits = jax.random.normal(keys[4], (T, X))
    if routing == "all_to_one":
        logits = logits.at[:, 2].add(50.0).at[:, 0].add(25.0)
    elif routing == "one_empty":
        logits = logits.at[:, 3].add(-50.0)
    weights, experts, _ = route(logits, K, normalize=True)
    if routing == "all_to_one":
        assert (np.asarray(experts[:, 0]) == 2).all()
    got = dropless_experts(x, weights, experts, gate, up, down, "silu", matmul)
    np.testing.assert_allclose(np.asarray(got), _naive_experts(x, weights, experts, gate, up, down), atol=1e-5)

    def loss(args, experts_fn):
        return jnp.sum(experts_fn(*args) ** 2)

    args = (x, gate, up, down)
    grads = jax.grad(loss)(args, lambda *a: dropless_experts(a[0], weights, experts, *a[1:], "silu", matmul))
    naive = jax.grad(loss)(args, lambda *a: _loop_experts(a[0], weights, experts, *a[1:]))
    for got_grad, want in zip(grads, naive):
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want), atol=2e-5, rtol=2e-5)
    used = set(np.asarray(experts).ravel().tolist())
    for e in range(X):  # an expert gets a gradient exactly when tokens reach it
        assert (np.abs(np.asarray(grads[1][e])).max() > 0) == (e in used)


def _loop_experts(x, weights, experts, gate, up, down):
    """The per-token loop in JAX (differentiable): each token's k experts gathered and applied."""
    h = jax.nn.silu(jnp.einsum("TE,TKEF->TKF", x, gate[experts])) * jnp.einsum("TE,TKEF->TKF", x, up[experts])
    return jnp.einsum("TK,TKF,TKFE->TE", weights, h, down[experts])


def test_block_layout_pads_each_expert_to_whole_blocks():
    """block_rows: each expert's pairs in token order from a block boundary, padding rows empty
    (T * K), each block's expert; enough blocks for any routing (all pairs on one expert)."""
    experts = jnp.asarray([[1, 0], [1, 2], [0, 1]], jnp.int32)  # pairs 0..5: experts 1 0 1 2 0 1
    rows = block_rows(experts, 4, block=2)
    M = 6
    assert rows.pair_at.shape == (2 * (3 + 4),)
    assert np.asarray(rows.pair_at).tolist() == [1, 4, 0, 2, 5, M, 3, M] + [M] * 6
    assert np.asarray(rows.groups).tolist() == [0, 1, 1, 2, 4, 4, 4]  # 4: unused, skipped
    assert block_size(8192, 8) == 256 and block_size(32, 4) == 8 and block_size(3000, 8) == 256
    # pairs on expert 4 of 4 (expert parallelism's padding) get no row
    rows = block_rows(jnp.asarray([[4, 0], [1, 4], [0, 1]], jnp.int32), 4, block=2)
    assert np.asarray(rows.pair_at).tolist() == [1, 4, 2, 5] + [M] * 10


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_load_balancing_loss_equals_transformers_aux_loss(family, tmp_path):
    """The routing stats of every MoE layer over the real tokens (right-padded rows) give
    transformers' aux_loss (`load_balancing_loss_func` with the attention mask), and the
    expert-load metrics read the same picks; the z-loss is the mean over real tokens and layers
    of logsumexp(transformers' router logits) ** 2."""
    from jaxft.losses import expert_load_metrics, load_balancing_loss, router_z_loss

    hf_model = make_hf_model(family)
    hf_model.save_pretrained(tmp_path)
    mask = np.ones_like(TOKENS)
    mask[1, 11:] = 0
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(TOKENS), attention_mask=torch.from_numpy(mask),
                       output_router_logits=True)
    want = float(out.aux_loss)
    lse = [torch.logsumexp(logits.double(), -1).numpy().reshape(mask.shape) for logits in out.router_logits]
    want_z = np.mean([np.sum(z ** 2 * mask) / mask.sum() for z in lse])
    model = load_hf(tmp_path)
    positions = np.broadcast_to(np.arange(16), (2, 16))
    _, (picks, probs, z) = model(jnp.asarray(TOKENS), jnp.asarray(positions), jnp.asarray(mask), return_router_stats=True)
    moe_layers = sum(model.cfg.is_moe_layer(i) for i in range(model.cfg.num_layers))
    assert picks.shape == probs.shape == (moe_layers, model.cfg.num_experts)
    assert np.asarray(picks.sum(-1)).tolist() == [27 * model.cfg.experts_per_token] * moe_layers
    assert float(load_balancing_loss(picks, probs, mask.sum())) == pytest.approx(want, rel=1e-5)
    assert float(router_z_loss(z, mask.sum())) == pytest.approx(want_z, rel=1e-5)
    load = expert_load_metrics(picks)
    share = float(load["moe/busiest_share"])
    assert 1 / model.cfg.num_experts <= share <= 1
    assert float(load["moe/load_max_over_mean"]) == pytest.approx(share * model.cfg.num_experts, rel=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_on_a_mesh_equals_one_device(family, tmp_path):
    """Experts (stacked kernels sharded over fsdp and tensor), the router and Qwen2-MoE's shared
    expert on an (data 2, fsdp 2, tensor 2) mesh: one device's loss and gradients, packed rows."""
    from tests.test_families import assert_mesh_equals_one_device

    def picks(grads, cfg):
        mlp = grads["layers"]["mlp"] if "layers" in grads else grads["groups"][0][0]["mlp"]
        return [mlp["gate_proj"][...], mlp["router"][...]]

    make_hf_model(family).save_pretrained(tmp_path)
    assert_mesh_equals_one_device(tmp_path, dict(data=2, fsdp=2, tensor=2), picks, atol_scale=1e-4)


@pytest.mark.parametrize("matmul", ["ragged", "blocks"])
def test_expert_adapters_in_the_grouped_matmuls_equal_merged_expert_kernels(matmul):
    """Each row through its expert's A then B (grouped matmuls, both layouts) equals the experts
    with kernels W[e] + scale A[e] B[e], in value and in the adapters' gradients; the adapters
    are stacked [X, in, r] / [X, r, out] on the experts axis and counted by num_adapter_params."""
    from jaxft.models.config import ModelConfig
    from jaxft.models.lora import LoRAParam, expert_adapters, num_adapter_params
    from jaxft.models.moe import MoE

    spec = LoRASpec(rank=2, alpha=6.0, targets=("gate_proj", "up_proj", "down_proj"))
    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=2, num_experts=4, experts_per_token=2, lora=spec)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    assert moe.gate_proj_lora_a.shape == (4, 16, 2) and moe.down_proj_lora_b.shape == (4, 2, 16)
    assert moe.gate_proj_lora_a.logical_axes == ("experts", "embed", "lora_rank")
    assert num_adapter_params(cfg) == 4 * 2 * (3 * 16 + 3 * 24)  # 4 experts, rank 2, (in + out) each
    assert num_adapter_params(cfg, active=True) == 2 * 2 * (3 * 16 + 3 * 24)  # the 2 a token uses (FLOPs)
    graphdef, adapters, rest = nnx.split(moe, LoRAParam, ...)
    adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), adapters)
    x = jax.random.normal(jax.random.key(1), (12, 16))
    weights, experts, _ = route(x @ moe.router[...], 2, normalize=True)
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    kernels = {n: getattr(moe, n)[...] for n in ("gate_proj", "up_proj", "down_proj")}

    def ours(adapters):
        module = nnx.merge(graphdef, adapters, rest)
        adapt = expert_adapters(module, spec)
        y = dropless_experts(x, weights, experts, *kernels.values(), "silu", matmul, adapt=adapt)
        return jnp.sum(y * cotangent)

    def merged(adapters):
        pure = nnx.to_pure_dict(adapters)
        w = [kernels[n] + spec.scale * jnp.einsum("xir,xro->xio", pure[f"{n}_lora_a"], pure[f"{n}_lora_b"])
             for n in kernels]
        return jnp.sum(dropless_experts(x, weights, experts, *w, "silu", matmul) * cotangent)

    (value, grads), (want, want_grads) = jax.value_and_grad(ours)(adapters), jax.value_and_grad(merged)(adapters)
    assert abs(float(value - merged(jax.tree.map(jnp.zeros_like, adapters)))) > 1e-2  # the adapters do something
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_the_router_losses_join_the_step_loss_times_their_coefficients(kind, tmp_path):
    """A step's loss with train.router_aux_loss_coef = a and train.router_z_loss_coef = b is the
    loss at 0 plus a x the logged moe/aux_loss plus b x moe/z_loss (SFT: the batch's routing;
    DPO: the policy's), and the expert load is logged; a dense model's step reports none of it."""
    import optax

    from jaxft.steps.common import RouterTraining
    from jaxft.steps.dpo import make_dpo_step
    from jaxft.steps.sft import make_sft_step
    from jaxft.steps.state import init_train_state

    make_hf_model("qwen2_moe").save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(0.0)
    rows = 4
    batch = {"tokens": jnp.asarray(np.random.default_rng(3).integers(1, 97, (rows, 16)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (rows, 16)),
             "segment_ids": jnp.asarray(np.repeat([[1] * 12 + [0] * 4], rows, axis=0), jnp.int32),
             "loss_mask": jnp.asarray(np.repeat([[0] * 4 + [1] * 8 + [0] * 4], rows, axis=0), jnp.int32)}
    if kind == "dpo":
        batch.update(chosen_row=jnp.array([0, 2]), chosen_segment=jnp.array([1, 1]), rejected_row=jnp.array([1, 3]),
                     rejected_segment=jnp.array([1, 1]), pair_mask=jnp.array([1, 1]), pair_index=jnp.array([0, 1]))

    def step_metrics(router_loss):
        if kind == "sft":
            step = make_sft_step(graphdef, tx, optax.constant_schedule(0.0), accumulate=2, router=router_loss)
            return jax.jit(step)(init_train_state(params, tx), batch)[1]
        step = make_dpo_step(graphdef, tx, optax.constant_schedule(0.0), loss_kwargs={}, reference_mode="none",
                             num_segments=1, rows_per_pair=2, accumulate=2, router=router_loss)
        return jax.jit(step)(init_train_state(params, tx), None, batch)[1]

    off, on = step_metrics(RouterTraining()), step_metrics(RouterTraining(aux_coef=0.5, z_coef=0.3))
    aux, z = float(on["moe/aux_loss"]), float(on["moe/z_loss"])
    assert aux > 1.0 and z > 0.5 and aux != z  # top-2 of 4 random experts: aux 2 when perfectly even
    assert float(on["loss"]) == pytest.approx(float(off["loss"]) + 0.5 * aux + 0.3 * z, rel=1e-5)
    assert 0.25 <= float(on["moe/busiest_share"]) <= 1 and float(on["moe/load_max_over_mean"]) >= 1
    assert "moe/aux_loss" not in step_metrics(None)


def test_moe_sft_learns_and_exports_to_transformers(tmp_path):
    """A tiny Mixtral with the bundled tokenizer trained by `configs/sft.py:tiny` from its folder,
    its routing balanced by the load-balancing loss and reported in metrics.jsonl."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, save_hf
    from jaxft.models.config import ModelConfig
    from tests.test_families import sft_learns_and_exports

    tok = load_bundled_tokenizer()
    cfg = ModelConfig(model_type="mixtral", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2, rope_theta=1e6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = save_hf(create_model(cfg, seed=7), tmp_path / "hf", tokenizer=tok)
    _, rows = sft_learns_and_exports(folder, tmp_path, "MixtralForCausalLM", **{"train.router_aux_loss_coef": 0.02})
    assert all(1.0 < r["moe/aux_loss"] < 4.0 and r["moe/load_max_over_mean"] >= 1.0 for r in rows)  # ~k = 2 when even


def test_scanned_layer_groups_report_routing_in_layer_order(tmp_path):
    """A pattern of two MoE layers (sliding, full) scanned twice, then a dense layer: the scan
    yields each pattern position's layers together; the stats come back in layer order, equal
    to the unrolled model's with the same weights."""
    from jaxft.models import create_model, save_hf
    from jaxft.models.config import ModelConfig
    from jaxft.models.hf import load_weights

    cfg = ModelConfig(model_type="qwen2_moe", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=5,
                      num_heads=2, num_kv_heads=1, num_experts=4, experts_per_token=2, moe_intermediate_size=16,
                      sliding_window=4, dense_layers=(4,), layer_types=("sliding_attention", "full_attention") * 2
                      + ("full_attention",))
    assert cfg.layer_groups()[0].period == 2 and cfg.layer_groups()[0].repeats == 2
    scanned = create_model(cfg, seed=1)
    unrolled = load_weights(save_hf(scanned, tmp_path / "hf"), cfg.replace(scan_layers=False))
    tokens = jnp.asarray(TOKENS)
    stats = nnx.jit(lambda model, tokens: model(tokens, return_router_stats=True)[1])  # one compile, not op by op
    want, got = stats(unrolled, tokens), stats(scanned, tokens)
    assert got[0].shape == (4, 4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got[1][1]), np.asarray(got[1][2]))  # layers differ: the order is seen


@pytest.mark.parametrize("kind,scan", [("sft", True), ("dpo", False)])
def test_the_selection_bias_moves_towards_even_load_after_each_step(kind, scan):
    """train.router_bias_update_rate = r (DeepSeek-V3's aux-loss-free balancing): after a step
    each MoE layer's e_score_correction_bias is its old value + r * sign(mean load - load) over
    the step's real tokens (experts picked more than the layer's mean expert move down), in
    scanned layer groups and unrolled layers; the dense layer has none; other params follow
    the optimizer (here lr 0: unchanged)."""
    import optax

    from jaxft.models import create_model
    from jaxft.models.config import ModelConfig
    from jaxft.steps.common import RouterTraining
    from jaxft.steps.dpo import make_dpo_step
    from jaxft.steps.router_bias import bias_rows
    from jaxft.steps.sft import make_sft_step
    from jaxft.steps.state import init_train_state

    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3,
                      num_heads=2, num_kv_heads=2, head_dim=8, kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, num_experts=8, experts_per_token=2, moe_intermediate_size=16,
                      dense_layers=(0,), router_scoring="sigmoid", router_groups=4, router_topk_groups=2,
                      router_bias=True, scan_layers=scan)
    model = create_model(cfg, seed=2)
    graphdef, params = nnx.split(model, nnx.Param)
    rows = 4
    batch = {"tokens": jnp.asarray(np.random.default_rng(3).integers(1, 97, (rows, 16)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (rows, 16)),
             "segment_ids": jnp.asarray(np.repeat([[1] * 12 + [0] * 4], rows, axis=0), jnp.int32),
             "loss_mask": jnp.asarray(np.repeat([[0] * 4 + [1] * 8 + [0] * 4], rows, axis=0), jnp.int32)}
    _, (picks, _, _) = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_router_stats=True)
    want_delta = 0.01 * np.sign(np.asarray(picks).mean(-1, keepdims=True) - np.asarray(picks))
    assert (want_delta != 0).any()
    tx, router = optax.sgd(0.0), RouterTraining(bias_update_rate=0.01)
    if kind == "sft":
        step = make_sft_step(graphdef, tx, optax.constant_schedule(0.0), router=router)
        new, metrics = jax.jit(step)(init_train_state(params, tx), batch)
    else:
        batch.update(chosen_row=jnp.array([0, 2]), chosen_segment=jnp.array([1, 1]), rejected_row=jnp.array([1, 3]),
                     rejected_segment=jnp.array([1, 1]), pair_mask=jnp.array([1, 1]), pair_index=jnp.array([0, 1]))
        step = make_dpo_step(graphdef, tx, optax.constant_schedule(0.0), loss_kwargs={}, reference_mode="none",
                             num_segments=1, rows_per_pair=2, router=router)
        new, metrics = jax.jit(step)(init_train_state(params, tx), None, batch)
    assert "router_picks" not in metrics
    old_flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    moved = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(new["params"])[0]:
        key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        old = np.asarray(old_flat[path])
        if key in bias_rows(cfg):
            index, moe_index = bias_rows(cfg)[key]
            want = old + (want_delta[moe_index][0] if index is None else np.zeros_like(old))
            if index is not None:
                want[index] += want_delta[moe_index]
            np.testing.assert_allclose(np.asarray(leaf), want, atol=1e-7)
            moved += len(moe_index)
        else:
            np.testing.assert_array_equal(np.asarray(leaf), old)
    assert moved == 2  # layers 1 and 2


def test_a_bias_update_rate_on_a_model_without_selection_biases_is_refused_naming_the_key():
    from types import SimpleNamespace

    from jaxft import config as config_lib
    from jaxft.models.config import ModelConfig
    from jaxft.tasks.base import StepSetup

    config = config_lib.load("configs/sft.py:tiny", {"train.router_bias_update_rate": 0.001})
    setup = SimpleNamespace(config=config, model_config=ModelConfig(model_type="mixtral", num_experts=4))
    with pytest.raises(ConfigError, match=r"train\.router_bias_update_rate=0\.001: this model \(mixtral\) has no "
                                          r"expert-selection bias.*set it to 0"):
        StepSetup.router_training.fget(setup)
