"""Tests for jaxft.losses: token log-probs, chunked cross-entropy, SFT loss, per-sequence sums
and every DPO loss type against golden values from an independent NumPy transcription of TRL
(tests/golden/make_dpo_golden.py)."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import losses

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "dpo_losses.json").read_text())
# Settings under which each loss type is valid (exo_pair needs eps > 0).
VALID_SETTINGS = {name: {"label_smoothing": 1e-3} if name == "exo_pair" else {} for name in losses.DPO_LOSS_TYPES}


@pytest.fixture(autouse=True)
def loud_rank_promotion():
    """Implicit rank promotion hides shape bugs; make it an error in these tests."""
    previous = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "raise")
    yield
    jax.config.update("jax_numpy_rank_promotion", previous)


def golden_inputs(num_pairs=None):
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in GOLDEN["inputs"].items()}
    return inputs if num_pairs is None else {k: v[:num_pairs] for k, v in inputs.items()}


def call_dpo(inputs, **kwargs):
    return losses.dpo_loss(
        inputs["chosen_logps"], inputs["rejected_logps"], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
        chosen_lengths=inputs["chosen_lengths"], rejected_lengths=inputs["rejected_lengths"], **kwargs)


# ---------------------------------------------------------------- targets and token log-probs


def test_shift_targets_never_crosses_a_segment_boundary():
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 0]], jnp.int32)
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)  # first token of segment 2 marked too
    targets, target_mask = losses.shift_targets(tokens, loss_mask, segments)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 10, 11, 0, 0]])
    # Position 2 (last of segment 1) would predict segment 2's first token: excluded.
    np.testing.assert_array_equal(target_mask, [[1, 1, 0, 1, 1, 0, 0, 0]])
    assert targets.dtype == jnp.int32 and target_mask.shape == tokens.shape


def test_full_token_logps_match_float64_log_softmax_and_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (2, 5, 11)), jnp.bfloat16)  # bf16 in, f32 out
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    logps, correct = losses.full_token_logps(logits, targets)
    ref = np.asarray(logits, np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    expected = np.take_along_axis(ref, np.asarray(targets)[..., None], -1)[..., 0]
    assert logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, expected, atol=1e-5)
    np.testing.assert_allclose(losses.token_logps(logits, targets), expected, atol=1e-5)
    np.testing.assert_array_equal(correct, ref.argmax(-1) == np.asarray(targets))


@pytest.mark.parametrize("vocab", [8192, 1000, 97])
def test_first_argmax_is_argmax_with_ties_going_to_the_first(vocab):
    """The losses' argmax (`chunk_plan.first_argmax`: block maxima, then inside the first block
    holding the maximum) is numpy's, ties included: small integers tie often, all-equal rows
    tie everywhere, a maximum in the last entry; 97 is prime (no blocks: a plain argmax)."""
    from jaxft.losses.chunk_plan import first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (2, 40, vocab)).astype(np.float32)
    x[0, :5] = 0.0
    x[0, 5, -1] = 9.0
    x[1, 0, ::7] = 5.0
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, x.argmax(-1))
    y = rng.normal(size=(3, vocab)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(y))), y.argmax(-1))


def test_mean_token_accuracy_counts_only_targets():
    correct = jnp.array([[True, False, True, True]])
    mask = jnp.array([[1, 1, 0, 1]])
    assert float(losses.mean_token_accuracy(correct, mask)) == pytest.approx(2 / 3)
    assert float(losses.mean_token_accuracy(correct, jnp.zeros_like(mask))) == 0.0


def _random_head(batch, length, embed, vocab, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(0, 1, (batch, length, embed)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(0, 0.5, (embed, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.normal(0, 1, (batch, length)), jnp.float32)
    return hidden, lm_head, targets, weights


def _packed_mask(batch, length, seed=0):
    """Target masks as the data gives them: a prompt, then a trained completion, per packed
    segment, then right padding (0)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.int32)
    for row in mask:
        start = 0
        while start < length - 2:
            prompt, completion = rng.integers(1, 4), rng.integers(1, 5)
            row[start + prompt:start + prompt + completion] = 1
            start += prompt + completion + rng.integers(0, 2)
    return jnp.asarray(mask)


@pytest.mark.parametrize("batch,length,chunk_size,groups,softcap", [
    (2, 12, 4, (1, 1), None),  # several chunks
    (2, 7, 16, (1, 1), None),  # rows shorter than a chunk
    (4, 10, 3, (2, 1), 5.0),  # soft-capped, row groups (data parallel devices)
    (4, 8, 3, (2, 2), None),  # rows and positions split (context parallelism)
])
def test_chunked_equals_full_in_values_and_gradients(batch, length, chunk_size, groups, softcap):
    hidden, lm_head, targets, weights = _random_head(batch, length, 8, 37)
    mask = _packed_mask(batch, length)
    mean_weights = jnp.flip(weights, axis=1)

    def full(h, w):
        logits = h @ w
        logps, correct = losses.full_token_logps(logits, targets, logit_softcap=softcap)
        means = (logits if softcap is None else softcap * jnp.tanh(logits / softcap)).mean(-1)
        trained = mask > 0
        out = (jnp.where(trained, logps, 0.0), correct & trained, jnp.where(trained, means, 0.0))
        return jnp.sum(out[0] * weights + out[2] * mean_weights), out

    def chunked(h, w):
        out = losses.chunked_token_logps(h, w, targets, mask, chunk_size=chunk_size, groups=groups,
                                         logit_softcap=softcap)
        return jnp.sum(out[0] * weights + out[2] * mean_weights), out

    @jax.jit  # one compile is much cheaper than dispatching the loops op by op
    def both(h, w):
        return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w) for f in (full, chunked)]

    ((_, want), grads_f), ((_, got), grads_c) = both(hidden, lm_head)
    assert got[0].shape == (batch, length) and got[0].dtype == jnp.float32
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # log-probs, 0 off the targets
    np.testing.assert_array_equal(got[1], want[1])  # argmax == target
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)  # vocabulary-mean logits
    np.testing.assert_allclose(grads_c[0], grads_f[0], atol=1e-5)  # d/d hidden
    np.testing.assert_allclose(grads_c[1], grads_f[1], atol=1e-5)  # d/d lm_head


def test_chunked_without_targets_is_zero_with_zero_gradients():
    hidden, lm_head, targets, _ = _random_head(2, 6, 4, 11)
    none = jnp.zeros((2, 6), jnp.int32)
    loss = lambda h, w: jnp.sum(losses.chunked_token_logps(h, w, targets, none, chunk_size=4)[0])  # noqa: E731
    value, (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, lm_head)
    assert float(value) == 0.0 and not np.any(dh) and not np.any(dw)


def _largest_intermediate(jaxpr) -> int:
    """Element count of the biggest value any equation (including nested ones) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


def test_chunked_holds_one_chunk_of_logits_whatever_the_batch():
    """Forward and backward, the biggest array is one chunk's [groups, chunk, V] logits: the
    same for 2 rows as for 8 (the old path held [rows, chunk, V])."""
    vocab, chunk = 200, 4  # a chunk's logits outsize the [rows * 12, 4] hidden states
    sizes = []
    for batch in (2, 8):
        hidden, lm_head, targets, _ = _random_head(batch, 12, 4, vocab)
        mask = _packed_mask(batch, 12)
        loss = lambda h, w: jnp.sum(losses.chunked_token_logps(h, w, targets, mask, chunk_size=chunk)[0])  # noqa: E731
        sizes.append(_largest_intermediate(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(
            hidden, lm_head).jaxpr))
    assert sizes == [chunk * vocab, chunk * vocab]


def test_auto_chunk_size_keeps_one_chunk_near_the_budget():
    from jaxft.losses.chunked import AUTO_CHUNK_RANGE, AUTO_LOGITS_BYTES

    for vocab in (512, 32_000, 49_152, 128_256, 151_936, 262_144):
        chunk = losses.auto_chunk_size(vocab)
        assert chunk % 128 == 0 and AUTO_CHUNK_RANGE[0] <= chunk <= AUTO_CHUNK_RANGE[1]
        if chunk > AUTO_CHUNK_RANGE[0]:
            assert chunk * vocab * 4 <= AUTO_LOGITS_BYTES
    assert losses.resolve_chunk_size(-1, 128_256) == losses.auto_chunk_size(128_256)
    assert losses.resolve_chunk_size(0, 128_256) == 0 and losses.resolve_chunk_size(96, 128_256) == 96


# ---------------------------------------------------------------- SFT loss and sequence sums


def test_sft_loss_micro_batches_with_normalizer_sum_to_full_batch():
    rng = np.random.default_rng(1)
    logps = jnp.asarray(-rng.uniform(0, 5, (4, 9)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, (4, 9)), jnp.int32)
    full, metrics = losses.sft_loss(logps, mask)
    expected = -np.sum(np.asarray(logps) * np.asarray(mask)) / np.sum(np.asarray(mask))
    np.testing.assert_allclose(full, expected, rtol=1e-6)
    assert float(metrics["num_tokens"]) == np.sum(np.asarray(mask)) and float(metrics["loss"]) == float(full)
    total = jnp.sum(mask).astype(jnp.float32)
    parts = [losses.sft_loss(logps[rows], mask[rows], normalizer=total)[0] for rows in (slice(0, 1), slice(1, 4))]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-6)


def test_sft_loss_with_no_target_tokens_is_zero_with_finite_gradient():
    logps = jnp.full((2, 4), -jnp.inf, jnp.float32)  # even -inf log-probs, if masked, are harmless
    mask = jnp.zeros((2, 4), jnp.int32)
    loss, metrics = losses.sft_loss(logps, mask)
    assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
    grad = jax.grad(lambda x: losses.sft_loss(x, mask)[0])(jnp.zeros((2, 4)))
    assert np.all(np.asarray(grad) == 0.0)
    assert float(losses.sft_loss(jnp.zeros((2, 4)), mask, normalizer=0.0)[0]) == 0.0


def _bigram_logps(tokens, targets, table):
    # A stand-in model whose prediction depends only on the current token, as a real model's
    # does only on its own segment: packing must not change any example's log-prob.
    return jnp.asarray(table)[tokens, targets]


def test_sequence_sums_on_a_packed_row_equal_each_example_alone():
    rng = np.random.default_rng(2)
    vocab, length = 13, 12
    table = rng.normal(-2, 1, (vocab, vocab)).astype(np.float32)
    mean_logit_table = rng.normal(0, 1, vocab).astype(np.float32)
    ex1, ex1_mask = [3, 4, 5, 6, 7], [0, 0, 1, 1, 1]
    ex2, ex2_mask = [8, 9, 10, 11], [1, 0, 1, 1]  # mask on its first token: never a target

    def row(examples):
        tokens, mask, segments = [], [], []
        for seg, (toks, msk) in enumerate(examples, start=1):
            tokens += toks
            mask += msk
            segments += [seg] * len(toks)
        pad = length - len(tokens)
        return [tokens + [0] * pad], [mask + [0] * pad], [segments + [0] * pad]

    def per_segment(tokens, mask, segments):
        tokens, mask, segments = (jnp.asarray(x, jnp.int32) for x in (tokens, mask, segments))
        targets, target_mask = losses.shift_targets(tokens, mask, segments)
        logps = _bigram_logps(tokens, targets, table)
        mean_logits = jnp.asarray(mean_logit_table)[tokens]
        return (losses.sequence_logps(logps, target_mask, segments, 2)[0],
                losses.sequence_lengths(target_mask, segments, 2)[0],
                losses.sequence_logit_means(mean_logits, target_mask, segments, 2)[0])

    packed = per_segment(*row([(ex1, ex1_mask), (ex2, ex2_mask)]))
    alone1 = per_segment(*row([(ex1, ex1_mask)]))
    alone2 = per_segment(*row([(ex2, ex2_mask)]))
    for got, one, two in zip(packed, alone1, alone2):
        np.testing.assert_allclose(got, [one[0], two[0]], rtol=1e-6)
    # Direct check of example 1: targets are tokens 5, 6, 7 predicted from 4, 5, 6.
    np.testing.assert_allclose(packed[0][0], table[4, 5] + table[5, 6] + table[6, 7], rtol=1e-6)
    np.testing.assert_array_equal(packed[1], [3.0, 2.0])
    np.testing.assert_allclose(packed[2][1], (mean_logit_table[9] + mean_logit_table[10]) / 2, rtol=1e-6)


# ---------------------------------------------------------------- DPO


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: json.dumps(c["kwargs"], sort_keys=True))
def test_dpo_loss_matches_trl_golden_values(case):
    loss, metrics = call_dpo(golden_inputs(), **case["kwargs"])
    np.testing.assert_allclose(float(loss), case["loss"], rtol=1e-5, atol=1e-5)
    assert set(metrics) == set(case["metrics"])
    for name, expected in case["metrics"].items():
        np.testing.assert_allclose(float(metrics[name]), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dpo_sigmoid_with_policy_equal_to_reference_is_ln2_with_zero_rewards():
    inputs = golden_inputs()
    same = dict(inputs, ref_chosen_logps=inputs["chosen_logps"], ref_rejected_logps=inputs["rejected_logps"])
    loss, metrics = call_dpo(same, loss_type="sigmoid", beta=0.3)
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[name]) == 0.0


def test_padded_pair_slots_change_nothing():
    """Every loss type: padding slots holding anything (NaN, huge values) leave the loss and the
    metrics at their golden (unpadded) values, and get exactly zero gradient."""
    inputs = golden_inputs()
    real_slots = jnp.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15])  # 12 real pairs among 16 slots
    mask = jnp.zeros((16,), jnp.float32).at[real_slots].set(1.0)
    @jax.jit  # all loss types in one program: a single compile, reused for each garbage fill
    def all_types(x):
        out = {}
        for name in losses.DPO_LOSS_TYPES:
            loss_fn = lambda c: call_dpo(dict(x, chosen_logps=c), pair_mask=mask,  # noqa: E731
                                         loss_type=name, **VALID_SETTINGS[name])
            out[name] = jax.value_and_grad(loss_fn, has_aux=True)(x["chosen_logps"])
        return out

    golden = {json.dumps(c["kwargs"], sort_keys=True): c for c in GOLDEN["cases"]}
    fills = [jnp.nan, -1e4]
    results = [all_types({k: jnp.full((16,), fill, jnp.float32).at[real_slots].set(v) for k, v in inputs.items()})
               for fill in fills]
    for name in losses.DPO_LOSS_TYPES:
        case = golden[json.dumps(dict(loss_type=name, **VALID_SETTINGS[name]), sort_keys=True)]
        grads = []
        for fill, result in zip(fills, results):
            (loss, metrics), grad = result[name]
            where = f"{name}, padding filled with {fill}"
            np.testing.assert_allclose(float(loss), case["loss"], rtol=1e-5, atol=1e-5, err_msg=where)
            for key, expected in case["metrics"].items():
                np.testing.assert_allclose(float(metrics[key]), expected, rtol=1e-5, atol=1e-5, err_msg=where)
            grad = np.asarray(grad)
            assert np.all(grad[np.asarray(mask) == 0] == 0.0) and np.all(np.isfinite(grad)), where
            grads.append(grad)
        np.testing.assert_array_equal(grads[0], grads[1], err_msg=name)
        assert np.any(grads[0] != 0.0), name


def test_no_real_pairs_gives_zero_loss_and_finite_gradients():
    inputs = golden_inputs()
    mask = jnp.zeros_like(inputs["chosen_logps"])
    loss_fn = lambda c: call_dpo(dict(inputs, chosen_logps=c), loss_type=["sigmoid", "aot", "sft"],  # noqa: E731
                                 pair_mask=mask)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(inputs["chosen_logps"])
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    assert np.all(np.asarray(grad) == 0.0)


def test_dpo_loss_under_jit_matches_eager():
    inputs = golden_inputs()
    kwargs = dict(loss_type=["sigmoid", "aot", "sft"], loss_weights=[1.0, 0.5, 0.1], beta=0.2)
    eager, _ = call_dpo(inputs, **kwargs)
    jitted, _ = jax.jit(functools.partial(call_dpo, **kwargs))(inputs)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


@pytest.mark.parametrize("kwargs,key", [
    (dict(loss_type="sigmoid", beta=0.0), "dpo.beta"),
    (dict(loss_type="sigmoid", beta=-0.1), "dpo.beta"),
    (dict(loss_type="dpo"), "dpo.loss_type"),
    (dict(loss_type=["sigmoid", "kto"]), "dpo.loss_type"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), "dpo.label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "dpo.label_smoothing"),
    (dict(loss_type="sigmoid", label_smoothing=1.0), "dpo.label_smoothing"),
    (dict(loss_type="sigmoid", label_smoothing=-0.1), "dpo.label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "dpo.loss_weights"),
    (dict(loss_type="sigmoid", f_divergence_type="kl"), "dpo.f_divergence_type"),
    (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "dpo.f_divergence_type"),
])
def test_invalid_settings_raise_naming_the_config_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        losses.validate_dpo_settings(kwargs.pop("loss_type"), kwargs.pop("beta", 0.1),
                                     kwargs.pop("label_smoothing", 0.0), kwargs.pop("loss_weights", None),
                                     **kwargs)


def test_dpo_loss_validates_too_and_lists_valid_types():
    with pytest.raises(ValueError, match=r"dpo\.loss_type.*sigmoid.*sigmoid_norm"):
        call_dpo(golden_inputs(), loss_type="simpo")
    with pytest.raises(ValueError, match=r"dpo\.beta"):
        call_dpo(golden_inputs(), beta=0.0)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sft"])
def test_length_normalised_losses_require_lengths(loss_type):
    inputs = golden_inputs()
    with pytest.raises(ValueError, match="lengths"):
        losses.dpo_loss(inputs["chosen_logps"], inputs["rejected_logps"], inputs["ref_chosen_logps"],
                        inputs["ref_rejected_logps"], loss_type=loss_type)


def test_validate_normalises_comma_separated_types_and_default_weights():
    types, weights = losses.validate_dpo_settings("sigmoid, bco_pair,sft", 0.1, 0.0, None)
    assert types == ("sigmoid", "bco_pair", "sft") and weights == (1.0, 1.0, 1.0)


def test_loss_type_names_are_trls():
    # Users copy TRL's DPOConfig(loss_type=...) names; every one of TRL's 15 must be accepted.
    trl = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert set(losses.DPO_LOSS_TYPES) == trl
