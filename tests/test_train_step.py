"""The pure SFT step: accumulation equivalence, non-finite skip, sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.models.from_config import split_params
from jaxft.parallel import sharding
from jaxft.models import create_model, get_preset
from jaxft.steps.optimizer import decay_mask, make_optimizer, make_schedule
from jaxft.steps.common import jit_step
from jaxft.steps.sft import make_sft_step
from jaxft.steps.state import create_train_state, init_train_state

CFG = get_preset("tiny").replace(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2)


def make_batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, (rows, length)).astype(np.int32)
    # Two packed examples per row, the second with a padding tail; varied lengths per row.
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        a = 4 + r % 5
        b = length - a - r % 3
        segments[r, :a], segments[r, a:a + b] = 1, 2
        positions[r, :a], positions[r, a:a + b] = np.arange(a), np.arange(b)
    loss_mask = (segments > 0).astype(np.int32)
    loss_mask[:, :2] = 0  # a "prompt"
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": loss_mask}


def setup(accumulate=1, lr=1e-2, clip=1.0):
    model = create_model(CFG, seed=0)
    graphdef, params = split_params(model)
    tx, schedule = make_optimizer(lr=lr, schedule="constant", total_steps=10, clip_norm=clip, weight_decay=0.1)
    step = make_sft_step(graphdef, tx, schedule, accumulate=accumulate)
    return graphdef, init_train_state(params, tx), step


def run_steps(step, state, batches):
    losses = []
    for b in batches:
        state, m = jax.jit(step)(state, b)
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_decreases():
    _, state, step = setup()
    batch = make_batch()
    _, losses = run_steps(step, state, [batch] * 15)
    assert losses[-1] < losses[0] - 0.5


def test_accumulation_equals_one_big_batch():
    """batch 8 x accumulate 1 == batch 8 as 8 micro-batches of 1 (token-normalised)."""
    batch = make_batch(rows=8)
    _, s1, step1 = setup(accumulate=1)
    _, s8, step8 = setup(accumulate=8)
    s1, l1 = run_steps(step1, s1, [batch] * 2)
    s8, l8 = run_steps(step8, s8, [batch] * 2)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        # Adam divides by sqrt(v): where a gradient is ~0, float noise in it moves the update by
        # up to ~1e-5; a real accumulation error moves it by ~lr = 1e-2.
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_non_finite_step_leaves_state_bit_identical():
    _, state, step = setup()
    state, _ = jax.jit(step)(state, make_batch())  # a real step first: non-trivial opt state
    before = jax.tree.map(np.asarray, state)
    poisoned = jax.tree.map(jnp.asarray, state)
    # NaN in one weight -> NaN loss and gradients.
    poisoned["params"]["norm"]["weight"] = poisoned["params"]["norm"]["weight"].at[0].set(jnp.nan)
    new, metrics = jax.jit(step)(poisoned, make_batch())
    assert float(metrics["skipped"]) == 1.0
    assert int(new["step"]) == int(before["step"])
    after = jax.tree.map(np.asarray, new)
    for path, a in jax.tree_util.tree_flatten_with_path(after["opt_state"])[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(before["opt_state"])[0])[path]
        assert np.array_equal(a, b, equal_nan=True), path
    unchanged = {k: v for k, v in after["params"].items() if k != "norm"}
    for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves({k: before["params"][k] for k in unchanged})):
        assert np.array_equal(a, b)


def test_sharded_step_equals_single_device():
    batch = make_batch(rows=8)
    _, state, step = setup()
    _, single = run_steps(step, state, [batch] * 3)

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        model = create_model(CFG, seed=0, mesh=mesh)
        graphdef, params = split_params(model)
        tx, schedule = make_optimizer(lr=1e-2, schedule="constant", total_steps=10, weight_decay=0.1)
        state, shardings = create_train_state(params, tx, mesh)
        # Adam moments follow their params' shardings (no replicated optimizer state).
        mu = state["opt_state"][1][0].mu["layers"]["mlp"]["up_proj"]
        assert mu.sharding.spec == state["params"]["layers"]["mlp"]["up_proj"].sharding.spec
        jitted = jit_step(make_sft_step(graphdef, tx, schedule), state_shardings=shardings,
                          batch_sharding=sharding.batch_sharding(mesh))
        losses = []
        for _ in range(3):
            glob = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
            state, m = jitted(state, glob)
            losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, single, rtol=1e-5)


def test_decay_mask_skips_norms_and_biases():
    mask = decay_mask({"layers": {0: {"input_layernorm": {"weight": 1}, "self_attn": {"q_bias": 1, "q_proj": 1}}},
                       "embed_tokens": 1})
    assert mask["layers"][0]["input_layernorm"]["weight"] is False
    assert mask["layers"][0]["self_attn"]["q_bias"] is False
    assert mask["layers"][0]["self_attn"]["q_proj"] is True and mask["embed_tokens"] is True


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    s = make_schedule(lr=1.0, schedule=schedule, warmup_steps=10, total_steps=100)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert float(s(99)) < 0.1 if schedule != "constant" else float(s(99)) == 1.0


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(lr=1.0, schedule="exp", warmup_steps=0, total_steps=10)


def _loss_and_grads(cfg, params=None):
    """SFT loss and gradients of a model of `cfg` (random init, or `params`) on one batch."""
    from jaxft import losses

    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    graphdef, initial = split_params(create_model(cfg, seed=0))

    def loss(p):
        logits = nnx.merge(graphdef, p)(batch["tokens"], batch["positions"], batch["segment_ids"])
        targets, mask = losses.shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
        return losses.sft_loss(losses.token_logps(logits, targets), mask)[0]

    return jax.jit(jax.value_and_grad(loss))(initial if params is None else params)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "offload"])
def test_remat_policies_give_the_same_loss_and_gradients(policy, scan):
    if policy == "offload" and jax.devices()[0].platform == "cpu":
        pytest.skip("offloading needs pinned host memory, which the CPU backend does not have")
    plain = _loss_and_grads(CFG.replace(scan_layers=scan))
    remat = _loss_and_grads(CFG.replace(scan_layers=scan, remat=policy))
    assert float(plain[0]) == pytest.approx(float(remat[0]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_and_unrolled_layers_give_the_same_loss_and_gradients(tmp_path):
    from jaxft.models import load_hf, save_hf
    from jaxft.models.config import read_hf_config
    from jaxft.models.hf import load_weights

    save_hf(create_model(CFG, seed=0), tmp_path)  # scanned by default; HF files are per layer
    unrolled = load_weights(tmp_path, read_hf_config(tmp_path).replace(scan_layers=False))
    scanned = load_hf(tmp_path)
    _, unrolled_params = split_params(unrolled)
    _, scanned_params = split_params(scanned)
    a = _loss_and_grads(CFG.replace(scan_layers=False), unrolled_params)
    b = _loss_and_grads(CFG, scanned_params)
    assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-6)
    for i in range(CFG.num_layers):  # layer i of the list is slice i of the stack
        for name in ("q_proj", "o_proj"):
            np.testing.assert_allclose(a[1]["layers"][i]["self_attn"][name],
                                       b[1]["layers"]["self_attn"][name][i], atol=1e-6)


def test_unknown_remat_policy_names_the_key():
    with pytest.raises(ValueError, match=r"model\.remat='most'.*none, full, dots, dots_no_batch, offload"):
        CFG.replace(remat="most")
    assert CFG.replace(remat=True).remat == "full" and CFG.replace(remat=False).remat == "none"
