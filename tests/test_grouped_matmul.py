"""The experts' grouped-matmul layouts (`jaxft.models.grouped_matmul`): the CPU blocks (used
blocks only, several kernels in one loop) and the TPU Pallas kernel (megablox `gmm`, checked in
Pallas interpret mode on CPU, alone and split over a mesh) equal `jax.lax.ragged_dot` in outputs
and gradients; "auto" picks per platform; the MoE SFT step compiles for a TPU slice with the
Pallas kernel in it (libtpu, no TPU)."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import ConfigError
from jaxft.models import grouped_matmul as gm
from jaxft.models.moe import dropless_experts, route

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed: pip install "jaxft[tpu]"')
T, E, F, X, K = 40, 128, 128, 4, 2  # the kernel tiles widths by 128


def _problem(routing: str):
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (T, E)) / 4
    gate, up = (jax.random.normal(k, (X, E, F)) / 8 for k in keys[1:3])
    down = jax.random.normal(keys[3], (X, F, E)) / 8
    logits = jax.random.normal(keys[4], (T, X))
    if routing == "all_to_one":
        logits = logits.at[:, 2].add(50.0).at[:, 0].add(25.0)
    elif routing == "one_empty":
        logits = logits.at[:, 3].add(-50.0)
    weights, experts, _ = route(logits, K, normalize=True)
    return (x, gate, up, down), weights, experts


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(layout, args, weights, experts):
    def loss(args):
        return jnp.sum(dropless_experts(args[0], weights, experts, *args[1:], "silu", layout) ** 2)

    return jax.value_and_grad(loss)(args)


def _assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5)


@pytest.fixture
def interpreted_gmm(monkeypatch):
    """The "gmm" layout with the Pallas kernel in interpret mode (no TPU here)."""
    monkeypatch.setitem(gm.LAYOUTS, "gmm", (gm.gmm_rows, functools.partial(gm.gmm_matmul, interpret=True)))


@pytest.mark.parametrize("routing", ["balanced", "all_to_one", "one_empty"])
def test_the_pallas_grouped_matmul_equals_ragged_dot_in_outputs_and_gradients(routing, interpreted_gmm):
    """80 pairs in one 128-row tile (48 rows past the groups), skewed or with an empty expert."""
    args, weights, experts = _problem(routing)
    _assert_same(_value_and_grads("gmm", args, weights, experts), _value_and_grads("ragged", args, weights, experts))


def test_the_pallas_grouped_matmul_split_over_a_mesh_equals_ragged_dot(interpreted_gmm):
    """Under a (data 2, fsdp 2, tensor 2) mesh each device runs the kernel on its slice of the
    sorted rows with the groups' sizes inside it (groups cut across devices): same numbers."""
    from jaxft.parallel.sharding import make_mesh

    args, weights, experts = _problem("balanced")
    want = _value_and_grads("ragged", args, weights, experts)
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        assert gm.gmm_rows(experts, X).pair_at.shape == (8 * 128,)  # a whole tile per device
        got = _value_and_grads("gmm", args, weights, experts)
    _assert_same(got, want)


def test_blocks_run_only_the_used_blocks_and_several_kernels_in_one_loop():
    """The CPU blocks: 8-row blocks (blocks past the last expert's carry expert X and are
    skipped, giving zeros), two kernels over the same rows in one loop; outputs and
    gradients equal ragged_dot's."""
    args, weights, experts = _problem("all_to_one")
    rows = gm.block_rows(experts, X, block=8)
    used = int(np.sum(np.asarray(rows.groups) < X))
    assert used < rows.groups.shape[0] and (np.asarray(rows.groups)[used:] == X).all()
    x, gate, up, _ = args
    xs = jnp.take(x, rows.pair_at // K, axis=0, mode="fill", fill_value=0)
    ragged = gm.ragged_rows(experts, X)
    xr = jnp.take(x, ragged.pair_at // K, axis=0)

    def both(matmul, groups, xs, gate, up):
        g, u = matmul(xs, (gate, up), groups)
        return jnp.sum(g * jnp.cos(u)), (g, u)

    (_, (g, u)), grads = jax.value_and_grad(both, argnums=(3, 4), has_aux=True)(
        gm.block_matmul, rows.groups, xs, gate, up)
    (_, (gr, ur)), want = jax.value_and_grad(both, argnums=(3, 4), has_aux=True)(
        gm.ragged_matmul, ragged.groups, xr, gate, up)
    real = np.asarray(rows.pair_at) < T * K  # the rows holding a pair, in the ragged order by pair
    order = np.argsort(np.asarray(rows.pair_at)[real], kind="stable")
    np.testing.assert_allclose(np.asarray(g)[real][order], np.asarray(gr)[np.argsort(np.asarray(ragged.pair_at))],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(u)[real][order], np.asarray(ur)[np.argsort(np.asarray(ragged.pair_at))],
                               atol=1e-5)
    assert not np.asarray(g)[~real].any()  # padding rows and skipped blocks: zeros
    _assert_same(grads, want)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_whole_expert_mlp_in_one_block_loop_equals_the_two_loops(activation, dtype):
    """`block_mlp` (gate, up, activation and down per block in one loop; its backward one loop
    that recomputes gate and up) equals `block_matmul` twice with the activation between, in
    outputs and in the gradients of rows and kernels; rows of skipped blocks give zeros. In
    bfloat16 the fused loop keeps the hidden block in float32 where the two loops round it to
    bfloat16 first: equal to bfloat16's precision."""
    from jaxft.models.parts import ACTIVATIONS

    act = ACTIVATIONS[activation]
    (x, gate, up, down), _, experts = _problem("all_to_one")
    rows = gm.block_rows(experts, X, block=8)
    xs = jnp.take(x, rows.pair_at // K, axis=0, mode="fill", fill_value=0).astype(dtype)
    kernels = tuple(w.astype(dtype) for w in (gate, up, down))
    cotangent = jnp.cos(jnp.arange(xs.size, dtype=jnp.float32)).reshape(xs.shape)

    def fused(xs, gate, up, down):
        return gm.block_mlp(xs, gate, up, down, rows.groups, act)

    def two_loops(xs, gate, up, down):
        g, u = gm.block_matmul(xs, (gate, up), rows.groups)
        return gm.block_matmul(act(g) * u, down, rows.groups)

    def loss(mlp, *args):
        return jnp.sum(mlp(*args).astype(jnp.float32) * cotangent)

    got, want = (jax.jit(jax.value_and_grad(functools.partial(loss, mlp), argnums=(0, 1, 2, 3)))(xs, *kernels)
                 for mlp in (fused, two_loops))
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(np.abs(np.asarray(w, np.float32)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol * scale, rtol=tol)
    y = np.asarray(jax.jit(fused)(xs, *kernels), np.float32)
    assert not y[np.asarray(rows.pair_at) == T * K].any()  # padding rows and skipped blocks: zeros


def test_auto_picks_the_layout_of_the_platform_and_a_bad_name_names_the_key():
    assert [gm.resolve("auto", p) for p in ("cpu", "tpu", "gpu")] == ["blocks", "gmm", "ragged"]
    assert gm.resolve("ragged", "tpu") == "ragged"
    with pytest.raises(ConfigError, match="model.moe_matmul='dense'.*auto, ragged, blocks, gmm"):
        gm.resolve("dense")


def test_the_model_moe_matmul_key_reaches_the_model_and_a_bad_name_names_it():
    import jaxft.config
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models.from_config import model_config

    def cfg(layout):
        config = jaxft.config.load(str(ROOT / "configs/sft.py:tiny"), {"model.moe_matmul": layout})
        return model_config(jaxft.config.typed(config), load_bundled_tokenizer())

    assert cfg("ragged").moe_matmul == "ragged" and cfg("auto").moe_matmul == "auto"
    with pytest.raises(ConfigError, match="model.moe_matmul='dense' is not a grouped-matmul layout"):
        cfg("dense")


@needs_libtpu
def test_the_moe_sft_step_compiles_for_tpu_with_the_pallas_grouped_matmul(tmp_path, monkeypatch):
    """`jaxft plan` on a tiny Qwen3-MoE (8 experts, 2 per token) for v5p-8 (FSDP 4): "auto"
    resolves to the Pallas kernel for the target, whose forward (`gmm`) and backward (`gmm`,
    `tgmm`) are Mosaic custom calls in the compiled step, and XLA reports its memory."""
    import jaxft.config
    from jaxft.data.assets import BUNDLED_TOKENIZER_DIR
    from jaxft.models import config_to_hf, get_preset
    from jaxft.perf import plan as plan_lib

    small = get_preset("qwen3_30b_a3b").replace(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, num_experts=8, experts_per_token=2, moe_intermediate_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(small)))
    config = jaxft.config.load(str(ROOT / "configs/sft.py:tiny"), {
        "mesh.data": 1, "mesh.fsdp": -1, "model.path": str(tmp_path), "model.tokenizer": str(BUNDLED_TOKENIZER_DIR)})
    compiled_hlo = []
    count = plan_lib.count_collectives
    monkeypatch.setattr(plan_lib, "count_collectives", lambda text: compiled_hlo.append(text) or count(text))
    r = plan_lib.plan(config, target="v5p-8")
    assert r.compiled and r.fits and r.compile_error is None and r.settings["moe_matmul"] == "gmm"
    kernels = re.findall(r'custom_call_target="tpu_custom_call".*?op_name="([^"]*)"', compiled_hlo[0])
    calls = [k.split("/")[-2] for k in kernels if "jit(gmm)" in k or "jit(tgmm)" in k]
    assert sorted(calls) == ["jit(gmm)"] * 6 + ["jit(tgmm)"] * 3  # gate, up, down: forward, dx, dw
    assert r.temp_bytes > 0 and r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    print(f"v5p-8 MoE SFT step with megablox gmm: {r.total_bytes / 2**20:.1f} MiB per device "
          f"({r.temp_bytes / 2**20:.1f} MiB temporaries), compiled in {r.compile_seconds:.0f} s")
