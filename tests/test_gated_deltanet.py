"""Gated DeltaNet's math (jaxft.models.gated_deltanet): the chunked rule against the step-by-step
one and transformers' torch functions, state and conv-window chaining, packed segments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import gated_deltanet

# jitted: op by op, the tests would take minutes
gated_delta_rule = jax.jit(gated_deltanet.gated_delta_rule, static_argnames=("chunk_size", "l2_normalize"))
gated_delta_rule_reference = jax.jit(gated_deltanet.gated_delta_rule_reference, static_argnames=("l2_normalize",))
causal_conv1d = jax.jit(gated_deltanet.causal_conv1d, static_argnames=("activation",))
B, G, H, K, V = 2, 2, 4, 8, 6  # H = 2 G: each q/k head serves two value heads


def _inputs(T, seed=0, batch=B):
    r = np.random.default_rng(seed)
    q, k = (r.normal(size=(batch, T, G, K)).astype(np.float32) for _ in range(2))
    v = r.normal(size=(batch, T, H, V)).astype(np.float32)
    g = (-0.4 * np.abs(r.normal(size=(batch, T, H)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-r.normal(size=(batch, T, H))))).astype(np.float32)
    state = r.normal(size=(batch, H, K, V)).astype(np.float32)
    return q, k, v, g, beta, state


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("chunk", [8, 32, 64])
def test_chunked_equals_step_by_step(chunk):
    """T = 37 is no multiple of 8 (5 chunks, the last padded) or 32 (the default: two chunks) and
    shorter than 64 (one chunk); an initial state is carried in. The default chunk against
    transformers: test_qwen3_5's unrolled dense model."""
    q, k, v, g, beta, state = _inputs(37)
    out, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=chunk)
    ref_out, ref_final = gated_delta_rule_reference(q, k, v, g, beta, initial_state=state)
    assert out.shape == (B, 37, H, V) and final.shape == (B, H, K, V)
    _close(out, ref_out)
    _close(final, ref_final)


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_gradients_equal_step_by_step(chunk):
    """Gradients w.r.t. every input, through segment starts (mid-chunk and on a chunk edge),
    padding, and the initial state (which the first segment of each row continues), at chunk 8
    and at the default 32."""
    T = 45
    q, k, v, g, beta, state = _inputs(T, seed=1)
    segments = np.array([[1] * 5 + [2] * 11 + [3] * 25 + [0] * 4, [0] * 3 + [1] * 42])
    r = np.random.default_rng(2)
    w_out, w_state = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))

    def loss(rule, args):
        out, final = rule(*args[:5], initial_state=args[5], segment_ids=segments)
        return jnp.sum(out * w_out) + jnp.sum(final * w_state)

    args = (q, k, v, g, beta, state)
    grads = jax.jit(jax.grad(lambda a: loss(lambda *x, **kw: gated_delta_rule(*x, chunk_size=chunk, **kw), a)))(args)
    ref_grads = jax.jit(jax.grad(lambda a: loss(gated_delta_rule_reference, a)))(args)
    for name, got, want in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, ref_grads):
        assert np.abs(want).max() > 0, name
        _close(got, want, rtol=2e-5)


def test_equals_transformers():
    """HF's torch_chunk_gated_delta_rule and torch_recurrent_gated_delta_rule, l2-normalized q / k,
    grouped value heads, an initial state."""
    torch = pytest.importorskip("torch")
    qwen = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    q, k, v, g, beta, state = _inputs(37, seed=3)  # the shapes of the test above: no new compile
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    for hf in (qwen.torch_chunk_gated_delta_rule, qwen.torch_recurrent_gated_delta_rule):
        hf_out, hf_final = hf(t(q), t(k), t(v), g=t(g), beta=t(beta), initial_state=t(state), output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
        for rule in (functools.partial(gated_delta_rule, chunk_size=64), gated_delta_rule_reference):
            out, final = rule(q, k, v, g, beta, initial_state=state)
            _close(out, hf_out.numpy(), rtol=2e-5)
            _close(final, hf_final.numpy(), rtol=2e-5)


def test_state_chains():
    """Two halves, the second started from the first's final state, equal one run (the split off a
    chunk edge); so do the first half chunked and the rest decoded a token at a time."""
    q, k, v, g, beta, _ = _inputs(40, seed=4)
    whole, whole_final = gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    zeros = np.zeros((B, H, K, V), np.float32)  # None's state, passed: the second half's program
    first, state = gated_delta_rule(*(x[:, :20] for x in (q, k, v, g, beta)), initial_state=zeros, chunk_size=16)
    second, final = gated_delta_rule(*(x[:, 20:] for x in (q, k, v, g, beta)), initial_state=state, chunk_size=16)
    _close(np.concatenate([first, second], axis=1), whole)
    _close(final, whole_final)
    for t in range(20, 40):
        token, state = gated_delta_rule_reference(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), initial_state=state)
        _close(token, whole[:, t:t + 1])
    _close(state, whole_final)


def _alone(q, k, v, g, beta, state, bounds):
    """Each segment [a, b) of a one-row batch run by itself (the first from `state`): outputs, final states."""
    runs = [gated_delta_rule_reference(*(x[:, a:b] for x in (q, k, v, g, beta)), initial_state=state if n == 0 else None)
            for n, (a, b) in enumerate(bounds)]
    return [out for out, _ in runs], [final for _, final in runs]


@pytest.mark.parametrize("rule", ["chunked", "reference"])
def test_packed_segments_equal_each_alone(rule):
    """Chunks of 8; segments of 5 (its end mid-chunk), 11 (ending on the chunk edge at 16) and 9,
    then 4 padding positions: each segment's outputs equal it run alone, the final state is the
    last segment's, padding reads nothing (0) and its values change nothing."""
    run = (lambda *a, **kw: gated_delta_rule(*a, chunk_size=8, **kw)) if rule == "chunked" else gated_delta_rule_reference
    q, k, v, g, beta, state = _inputs(29, seed=5, batch=1)
    bounds = [(0, 5), (5, 16), (16, 25)]
    segments = np.array([[1] * 5 + [2] * 11 + [3] * 9 + [0] * 4])
    out, final = run(q, k, v, g, beta, segment_ids=segments, initial_state=state)
    alone, alone_finals = _alone(q, k, v, g, beta, state, bounds)
    for (a, b), want in zip(bounds, alone):
        _close(out[:, a:b], want)
    _close(final, alone_finals[-1])
    assert not np.asarray(out[:, 25:]).any()
    noisy = [x.copy() for x in (q, k, v, g, beta)]
    for x in noisy:
        x[:, 25:] = 7.0 * np.sign(x[:, 25:])  # padding values (even a growing decay) must not matter
    out2, final2 = run(*noisy, segment_ids=segments, initial_state=state)
    _close(out2, out)
    _close(final2, final)


def test_left_padding_and_padding_between_segments():
    """Left padding then a segment equals the segment alone; a segment whose id repeats after
    padding continues its state (the padding is skipped, not a reset)."""
    q, k, v, g, beta, _ = _inputs(29, seed=6, batch=1)
    segments = np.array([[0] * 6 + [1] * 23])
    out, final = gated_delta_rule(q, k, v, g, beta, segment_ids=segments, chunk_size=8)
    (alone,), (alone_final,) = _alone(q, k, v, g, beta, None, [(6, 29)])
    _close(out[:, 6:], alone)
    _close(final, alone_final)
    keep = np.r_[0:10, 13:29]
    segments = np.array([[1] * 10 + [0] * 3 + [1] * 16])
    out, final = gated_delta_rule(q, k, v, g, beta, segment_ids=segments, chunk_size=8)
    squeezed, squeezed_final = gated_delta_rule_reference(*(x[:, keep] for x in (q, k, v, g, beta)))
    _close(out[:, keep], squeezed)
    _close(final, squeezed_final)


def test_low_precision_inputs():
    q, k, v, g, beta, _ = _inputs(37, seed=7)
    out, final = gated_delta_rule(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), g, beta, chunk_size=8)
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    with pytest.raises(ValueError, match="multiple"):
        gated_deltanet.gated_delta_rule(q, k, v[:, :, :3], g[..., :3], beta[..., :3])


def _conv_inputs(T, C=5, W=4, seed=8):
    r = np.random.default_rng(seed)
    return r.normal(size=(B, T, C)).astype(np.float32), r.normal(size=(W, C)).astype(np.float32)


def test_conv_equals_torch_depthwise_conv():
    torch = pytest.importorskip("torch")
    x, w = _conv_inputs(13)
    conv = torch.nn.Conv1d(5, 5, kernel_size=4, groups=5, padding=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w.T[:, None, :]))  # HF's [C, 1, W]
        want = torch.nn.functional.silu(conv(torch.from_numpy(x).transpose(1, 2))[..., :13]).transpose(1, 2)
    y, window = causal_conv1d(x, w)
    _close(y, want.numpy())
    _close(window, x[:, -3:])
    y, _ = causal_conv1d(x, w, activation=None)
    assert not np.allclose(y, want.numpy(), atol=1e-3)  # silu was applied above


def test_conv_window_chains():
    x, w = _conv_inputs(15)
    whole, whole_window = causal_conv1d(x, w)
    first, window = causal_conv1d(x[:, :7], w)
    second, window = causal_conv1d(x[:, 7:], w, window=window)
    _close(np.concatenate([first, second], axis=1), whole)
    _close(window, whole_window)
    token, _ = causal_conv1d(x[:, 14:], w, window=x[:, 11:14])  # one decoding step
    _close(token, whole[:, 14:])


def test_conv_never_crosses_a_segment_start():
    x, w = _conv_inputs(12)
    segments = np.array([[1] * 2 + [2] * 6 + [3] * 4, [0] * 5 + [1] * 7])
    window = np.random.default_rng(9).normal(size=(B, 3, 5)).astype(np.float32)
    y, _ = causal_conv1d(x, w, segment_ids=segments, window=window)
    for a, b in [(0, 2), (2, 8), (8, 12)]:
        alone, _ = causal_conv1d(x[:1, a:b], w, window=window[:1] if a == 0 else None)
        _close(y[:1, a:b], alone)
    alone, _ = causal_conv1d(x[1:, 5:], w)
    _close(y[1:, 5:], alone)


def test_bench_reports_both_rules_and_the_ratios():
    """`jaxft bench --gated-deltanet` at a tiny shape: every rule timed, the ratios and linearity."""
    from jaxft.perf.bench_gated_deltanet import format_gated_deltanet_bench, run_gated_deltanet_bench

    report = run_gated_deltanet_bench(lengths=(24, 48), key_heads=1, value_heads=2, head_dim=4, chunk_sizes=(8,),
                                      rounds=1, reference_backward_max=24)
    assert set(report["lengths"][24]["backward"]) == {"chunked 8", "reference"}
    assert "reference" not in report["lengths"][48]["backward"]  # past --reference-backward-max
    assert report["lengths"][48]["backward_temp_mib"]["reference"] > 0
    assert set(report["ratio_forward"]) == {24, 48} and set(report["ratio_backward"]) == {24}
    assert all(x > 0 for x in report["ratio_forward"].values())
    text = format_gated_deltanet_bench(report)
    assert "chunked 8 / reference tokens/s, forward: T=24:" in text and "at T=48 / at T=24" in text


def test_bench_skips_a_step_by_step_backward_the_free_memory_cannot_hold(monkeypatch):
    """Below --reference-backward-max the step-by-step backward still runs only where its planned
    temp bytes fit 70% of the free memory (8.6 GiB at 4,096 tokens would kill a Colab kernel)."""
    from jaxft.perf import bench_gated_deltanet as bench

    assert bench.free_bytes() > 2**20  # this Linux host's MemAvailable (a CPU device reports no limit)
    monkeypatch.setattr(bench, "free_bytes", lambda: 1024)
    report = bench.run_gated_deltanet_bench(lengths=(24,), key_heads=1, value_heads=2, head_dim=4, chunk_sizes=(8,),
                                            rounds=1, reference_backward_max=24)
    assert set(report["lengths"][24]["backward"]) == {"chunked 8"} and report["ratio_backward"] == {}
    assert report["lengths"][24]["backward_temp_mib"]["reference"] * 2**20 > 0.7 * 1024
    assert "| 24 | reference |" in bench.format_gated_deltanet_bench(report)
