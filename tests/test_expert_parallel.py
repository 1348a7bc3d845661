"""Expert parallelism (jaxft.models.expert_parallel): MoE experts split over the "expert" mesh
axis, pairs sent to their experts' devices by all-to-all, equal one device (loss, gradients,
router statistics) for any routing, including every token to one expert; a bad mesh.expert is a
config error naming the key."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxft.config
from jaxft.data.assets import BUNDLED_TOKENIZER_DIR
from jaxft.errors import ConfigError
from jaxft.models import config_to_hf, get_preset, load_hf
from jaxft.models.expert_parallel import over_mesh
from jaxft.models.moe import dropless_experts
from jaxft.parallel import sharding

T, E, F, X, K = 64, 8, 12, 8, 2


def _experts_inputs(routing, T=T):
    rng = np.random.default_rng(0)
    x, gate, up, down = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                         ((T, E), (X, E, F), (X, E, F), (X, F, E)))
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32)
    if routing == "all_to_one":  # every pair to experts 6 and 7: both on the last expert device
        experts = jnp.broadcast_to(jnp.array([7, 6], jnp.int32), (T, K))
    else:
        experts = jnp.asarray(np.argsort(rng.uniform(size=(T, X)), axis=1)[:, :K], jnp.int32)
    return x, weights, experts, gate, up, down


def _loss_and_grads(mesh, args):
    def loss(x, w, gate, up, down):
        y = over_mesh(dropless_experts)(x, w, args[2], gate, up, down, "silu")
        return jnp.sum(jnp.sin(y))  # gradients that differ per row and per output

    x, w, _, gate, up, down = args
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        return step(x, w, gate, up, down), step.lower(x, w, gate, up, down).compile().as_text()


@pytest.mark.parametrize("routing, tokens", [("random", T), ("all_to_one", T), ("random", 5)])
def test_expert_parallel_experts_equal_one_device(routing, tokens):
    """(data 2, expert 4): 8 tokens a device, 2 of the 8 experts a device; every pair computed
    (all 128 pairs to one device's two experts fill its worst-case buffer), the output and the
    gradients of x, the routing weights and every expert kernel those of one device, and the
    compiled program moves the pairs with all-to-alls. 5 tokens (a decoding step's few) are
    padded to one a device."""
    args = _experts_inputs(routing, tokens)
    (value, grads), _ = _loss_and_grads(sharding.make_mesh(data=1, devices=jax.devices()[:1]), args)
    (ep_value, ep_grads), hlo = _loss_and_grads(sharding.make_mesh(data=2, expert=4), args)
    assert "all-to-all" in hlo
    np.testing.assert_allclose(ep_value, value, rtol=1e-5)
    # An expert kernel's gradient sums its pairs' outer products in another order (per source
    # device): float32 rounding of sums up to ~100 with cancellation, hence 1e-4 of the largest.
    for got, want in zip(ep_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    if routing == "all_to_one":  # the experts no pair reached get no gradient
        assert not np.any(np.asarray(ep_grads[2])[:6]) and np.all(np.any(np.asarray(ep_grads[2])[6:], axis=(1, 2)))


def test_expert_adapters_split_with_their_experts_equal_one_device():
    """Per-expert LoRA adapters (gate, up, down) on (data 2, expert 4): each device runs its
    experts' A and B on the pairs it receives; the output and every adapter's gradient equal
    one device's."""
    from jaxft.models.lora import ExpertAdapters, LoRASpec

    x, w, experts, gate, up, down = _experts_inputs("random")
    spec = LoRASpec(rank=2, alpha=4.0, targets=("gate_proj", "up_proj", "down_proj"))
    shapes = {"gate_proj": ((X, E, 2), (X, 2, F)), "up_proj": ((X, E, 2), (X, 2, F)),
              "down_proj": ((X, F, 2), (X, 2, E))}
    rng = np.random.default_rng(1)
    pairs = {n: tuple(jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for s in ab) for n, ab in shapes.items()}

    def run(mesh, pairs):
        def loss(pairs):
            adapt = ExpertAdapters(pairs, spec) if pairs else None
            return jnp.sum(jnp.sin(over_mesh(dropless_experts)(x, w, experts, gate, up, down, "silu", adapt=adapt)))

        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss))(pairs)

    one = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    (value, grads), (ep_value, ep_grads) = run(one, pairs), run(sharding.make_mesh(data=2, expert=4), pairs)
    assert abs(float(value - run(one, {})[0])) > 1e-2  # the adapters do something
    np.testing.assert_allclose(ep_value, value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(ep_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def _model_loss_and_grads(folder, mesh):
    """Loss (mean tanh of the logits plus the router statistics' sums), gradients of an expert
    kernel, the router and a query projection, and the router statistics, of the HF folder's model on
    `mesh`: 8 packed rows of 16 tokens split over the batch axes."""
    tokens = np.random.default_rng(1).integers(0, 97, size=(8, 16))
    segments = np.repeat([[1] * 10 + [2] * 4 + [0] * 2], 8, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(4), [0, 0]])[None].repeat(8, axis=0).astype(np.int32)
    model = load_hf(folder, mesh=mesh)
    graphdef, params = nnx.split(model)

    def loss(p, t, pos, seg):
        logits, stats = nnx.merge(graphdef, p)(t, pos, seg, return_router_stats=True)
        return jnp.mean(jnp.tanh(logits)), stats  # picks, probs, z

    with jax.set_mesh(mesh):
        batch = [jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh)) for x in (tokens, positions, segments)]
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, stats), grads = step(params, *batch)
        hlo = step.lower(params, *batch).compile().as_text()
    layers = grads["layers"]
    picked = [layers["mlp"][name][...] for name in ("gate_proj", "down_proj", "router")]
    return float(value), [np.asarray(g) for g in (*picked, layers["self_attn"]["q_proj"][...], *stats)], hlo


@pytest.mark.parametrize("family, axes", [("mixtral", dict(data=2, expert=4)),
                                          ("qwen3_moe", dict(data=1, fsdp=2, expert=2, tensor=2))],
                         ids=["mixtral-data2-expert4", "qwen3_moe-fsdp2-expert2-tensor2"])
def test_moe_model_with_expert_parallelism_equals_one_device(family, axes, tmp_path):
    """A tiny Mixtral (4 experts, one a device) and Qwen3-MoE (6 experts top 3, three a device,
    their kernels' embed and mlp axes also split over fsdp and tensor): loss, gradients and
    router statistics equal one device's; the pairs travel by all-to-all."""
    from tests.hf_reference import make_hf_model

    make_hf_model(family).save_pretrained(tmp_path)
    one = _model_loss_and_grads(tmp_path, sharding.make_mesh(data=1, devices=jax.devices()[:1]))
    many = _model_loss_and_grads(tmp_path, sharding.make_mesh(**axes))
    assert "all-to-all" in many[2] and "all-to-all" not in one[2]
    assert many[0] == pytest.approx(one[0], rel=1e-5, abs=1e-7)
    for got, want in zip(many[1], one[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mesh_expert_size_one_adds_no_axis_and_batches_split_over_expert():
    """Without expert parallelism the mesh is the one it always was (programs unchanged); with
    it the expert axis splits batch rows and parameters' embed axis, and MoE experts."""
    assert sharding.make_mesh(data=2, fsdp=4).axis_names == ("data", "fsdp", "sequence", "tensor")
    mesh = sharding.make_mesh(data=2, expert=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "sequence": 1, "tensor": 1}
    assert sharding.batch_sharding(mesh).spec == jax.P(("data", "fsdp", "expert"), "sequence")
    assert sharding.logical_to_spec(("experts", "embed", "mlp"), (8, 16, 32), mesh) == jax.P("expert", None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 32), mesh) == jax.P("expert", None)


def _small_moe_config(tmp_path, num_experts, **overrides):
    """configs/sft.py:tiny on a 2-layer Qwen3-30B-A3B-shaped MoE (num_experts experts, top 2)."""
    small = get_preset("qwen3_30b_a3b").replace(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=num_experts,
        experts_per_token=2, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(small)))
    return jaxft.config.load("configs/sft.py:tiny", {"model.path": str(tmp_path),
                                                     "model.tokenizer": str(BUNDLED_TOKENIZER_DIR), **overrides})


def test_mesh_expert_that_does_not_divide_the_experts_is_a_config_error(tmp_path):
    from jaxft.perf import plan as plan_lib

    config = _small_moe_config(tmp_path, 6, **{"mesh.data": 2, "mesh.expert": 4})
    with pytest.raises(ConfigError, match=r"mesh\.expert=4 does not divide the model's 6 experts"):
        plan_lib.plan(config, target="8xH100")
    with pytest.raises(ConfigError, match=r"mesh\.data \* mesh\.fsdp \* mesh\.expert = 8"):
        sharding.check_batch_divisibility(jaxft.config.load("configs/sft.py:tiny", {
            "mesh.data": 2, "mesh.expert": 4, "train.batch_size": 4}), sharding.mesh_from_config(config))


def test_plan_compiles_expert_parallelism_for_a_tpu_with_all_to_alls(tmp_path):
    """`jaxft plan` on v5p-8 with mesh.expert=4: the TPU program sends the pairs by all-to-all,
    and the plan's mesh line and collectives name the axis and the all-to-alls."""
    from jaxft.perf import plan as plan_lib

    pytest.importorskip("libtpu")
    r = plan_lib.plan(_small_moe_config(tmp_path, 8, **{"mesh.data": 1, "mesh.expert": 4}), target="v5p-8")
    assert r.compiled and r.fits and r.mesh["expert"] == 4
    assert r.collectives["all-to-all"] > 0
    assert "mesh data 1 x fsdp 1 x expert 4 x sequence 1 x tensor 1" in plan_lib.format_plan(r)
    assert "all-to-all" in plan_lib.format_plan(r)


def test_an_sft_run_with_an_expert_axis_equals_one_without(tmp_path):
    """Outside MoE layers the expert axis is a batch axis: a tiny dense model's SFT run on
    (data 2, expert 4) (rows, the chunked vocabulary-parallel loss, weights' embed axis split
    over expert) logs the losses, gradient norms and eval loss of a data-parallel run."""
    from tests.test_context_parallel import _train

    overrides = {"data.packing": True, "train.loss_chunk_size": 16}
    expert = _train("sft", tmp_path / "expert", **{**overrides, "mesh.data": 2, "mesh.expert": 4})
    plain = _train("sft", tmp_path / "plain", **{**overrides, "mesh.data": -1})
    assert [len(x) for x in expert] == [len(x) for x in plain] == [3, 1]
    for a, b in zip(expert[0] + expert[1], plain[0] + plain[1]):
        for key in ("loss", "grad_norm", "mean_token_accuracy", "eval_loss"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
