"""Every attention backend that runs on CPU equals the original einsum attention (the "reference"
backend) under the model's mask: packed rows with padding, GQA and MHA, sliding windows, a KV
cache offset, a logit soft-cap; outputs and gradients; padding queries stay finite; `resolve`
picks per platform."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import attention
from jaxft.models.attention import BACKENDS, AttentionMask, attend, resolve
from jaxft.parallel.sharding import make_mesh

ATOL = 1e-5


def _rows(*runs_per_row) -> np.ndarray:
    """Segment ids [B, L] from (segment, run length) pairs per row, e.g. [1,1,1,2,2,3,3,3,0,0]."""
    rows = [np.repeat([s for s, _ in runs], [n for _, n in runs]) for runs in runs_per_row]
    return np.stack(rows).astype(np.int32)


# Two packed rows of 20 tokens, different layouts, each ending in padding.
PACKED = _rows([(1, 3), (2, 2), (3, 3), (4, 7), (0, 5)], [(1, 9), (2, 1), (3, 6), (0, 4)])


def _qkv(B, L, S, H, K, D=8, seed=0, q_scale=1.0):
    """q [B, L, H, D], k / v [B, S, K, D] and output weights [B, L, H, D], fixed by the seed.
    q_scale widens the scores (about N(0, q_scale^2) after the 1 / sqrt(D)), so a cap bites."""
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return (q_scale * jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, S, K, D)),
            jax.random.normal(kv, (B, S, K, D)), jax.random.normal(kw, (B, L, H, D)))


def _outputs_and_grads(name, q, k, v, w, q_seg, kv_seg, q_offset, window, **opts):
    """Output [B, L, H, D]; grads of sum(w * out) w.r.t. q, k, v with w zero on padding queries
    (what a loss sees); and grads with w on every query (only checked for being finite).
    A Python-int q_offset stays static (splash and cuDNN's causal flag need a known 0).
    name: a key of BACKENDS, or a function with a backend's signature."""
    backend = BACKENDS[name] if isinstance(name, str) else name

    def run(q, k, v, w, q_offset):
        mask = AttentionMask(jnp.asarray(q_seg), jnp.asarray(kv_seg), q_offset, window)
        out, vjp = jax.vjp(lambda q, k, v: backend(q, k, v, mask, **opts), q, k, v)
        valid = jnp.asarray(q_seg != 0)[:, :, None, None]
        return out, vjp(jnp.where(valid, w, 0.0)), vjp(w)

    return jax.jit(run, static_argnums=(4,) if isinstance(q_offset, int) else ())(q, k, v, w, q_offset)


@functools.cache
def _reference(shapes, q_seg_rows, kv_seg_rows, q_offset, window, logit_softcap=None):
    # Cached (segment ids as tuples): several backends are checked against each reference case,
    # and compiles are this file's cost on 2 cores.
    q_seg, kv_seg = np.array(q_seg_rows, np.int32), np.array(kv_seg_rows, np.int32)
    out, grads, _ = _outputs_and_grads("reference", *_qkv(*shapes), q_seg, kv_seg, q_offset, window,
                                       logit_softcap=logit_softcap)
    return out, grads


def _assert_matches_reference(name, shapes, q_seg, kv_seg, q_offset=0, window=None, logit_softcap=None,
                              **opts):
    """`shapes`: _qkv's arguments (B, L, S, H, K, D, seed[, q_scale]); segment ids: numpy
    [B, L] / [B, S]. logit_softcap goes to the backend and to the reference alike."""
    out, grads, grads_all = _outputs_and_grads(name, *_qkv(*shapes), q_seg, kv_seg, q_offset, window,
                                               logit_softcap=logit_softcap, **opts)
    as_key = lambda seg: tuple(map(tuple, seg.tolist()))  # noqa: E731
    ref_out, ref_grads = _reference(shapes, as_key(q_seg), as_key(kv_seg), int(q_offset), window,
                                    logit_softcap)
    valid = (q_seg != 0)[:, :, None, None]
    # Padding queries have no key to attend to: their value is the backend's own, but finite.
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref_out, 0), atol=ATOL)
    assert np.isfinite(out).all()
    for got, want, everywhere, arg in zip(grads, ref_grads, grads_all, "qkv"):
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"d{arg}")
        assert np.isfinite(everywhere).all(), f"d{arg} with weight on padding queries"


# blockwise with query / key blocks that do not divide L = 20 (both padded) and cross segments,
# so the skipped and the partially masked blocks are both exercised; xla is cudnn's code path.
CPU_BACKENDS = [
    ("blockwise", {"block_q": 4, "block_k": 8}),
    ("blockwise", {"block_q": 8, "block_k": 4}),
    ("xla", {}),
]


@pytest.mark.parametrize("name,opts", CPU_BACKENDS, ids=["blockwise-4x8", "blockwise-8x4", "xla"])
@pytest.mark.parametrize("H,K", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_packed_rows_match_the_reference(name, opts, H, K, window):
    _assert_matches_reference(name, (2, 20, 20, H, K), PACKED, PACKED, window=window, **opts)


# A decode step against a 32-slot cache filled up to slot 24: row 0 one sequence; row 1 left-
# padded, and its last token is padding (a finished row). Unfilled slots are 0.
CACHE = _rows([(1, 24), (0, 8)], [(0, 3), (2, 20), (0, 9)])


@pytest.mark.parametrize("name,L,window", [
    ("blockwise", 1, None), ("blockwise", 4, 5), ("xla", 1, None), ("xla", 4, 5), ("splash", 4, 5),
])
def test_decode_with_a_query_offset_matches_the_reference(name, L, window):
    # q_offset is traced (a cache index under jit); splash has no offset and runs blockwise.
    # Key blocks of 8: the block after the queries is skipped, and with the window the first two.
    offset = 24 - L
    _assert_matches_reference(name, (2, L, 32, 4, 2, 8, 1), CACHE[:, offset:24], CACHE,
                              q_offset=jnp.int32(offset), window=window, block_q=4, block_k=8)


@pytest.mark.parametrize("L,window,mesh,softcap", [
    (256, None, None, None),
    (384, 160, dict(data=2, fsdp=2, tensor=2), 5.0),
    (256, 100, dict(data=2, sequence=2, tensor=2), 5.0),
], ids=["256", "384-window160-softcap-mesh", "256-window100-softcap-sequence-mesh"])
def test_splash_kernel_matches_the_reference_in_interpret_mode(L, window, mesh, softcap, monkeypatch):
    # Pallas interpret mode runs the TPU kernel's own code on CPU, forward and backward.
    # L = 384 tiles by 128: three blocks, with a window reaching across block boundaries; and
    # under a data x fsdp x tensor mesh, so it runs per shard (rows and kv heads split), as a
    # Mosaic kernel must on TPU, with a logit soft-cap. The last case runs the context-parallel
    # split (tokens over "sequence": one 128-query block per shard), its kernel capped too.
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    monkeypatch.setattr(attention, "blockwise", None)  # the kernel itself must run, no fallback
    seg = _rows([(1, 100), (2, 60), (3, 76), (0, L - 236)], [(1, 30), (2, 200), (0, L - 230)])
    shapes = (2, L, L, 4, 2, 32, 2) + ((4.0,) if softcap else ())
    with contextlib.ExitStack() as stack:
        if mesh:
            stack.enter_context(jax.set_mesh(make_mesh(**mesh)))
        _assert_matches_reference("splash", shapes, seg, seg, window=window, logit_softcap=softcap,
                                  interpret=True)


# --- logit soft-cap (Gemma 2): c * tanh(scores / c) before the mask --------------------------------

SOFTCAP = 5.0
# q scaled by 4: scaled scores about N(0, 16), so many pass the cap of 5 and tanh bends them all.
CAPPED = (2, 20, 20, 4, 2, 8, 3, 4.0)


def _numpy_attention(q, k, v, q_seg, kv_seg, window, cap):
    """An independent float64 formula, one (row, head, query) at a time: [B, L, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, L, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for b, h, i in np.ndindex(B, H, L):
        keys = [j for j in range(k.shape[1]) if j <= i and (not window or i - j < window)
                and q_seg[b, i] == kv_seg[b, j] != 0]
        if not keys:
            continue
        scores = k[b, keys, h // G] @ q[b, i, h] / np.sqrt(D)
        if cap:
            scores = cap * np.tanh(scores / cap)
        p = np.exp(scores - scores.max())
        out[b, i, h] = (p / p.sum()) @ v[b, keys, h // G]
    return out


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_softcapped_reference_equals_the_formula(window):
    q, k, v, _ = _qkv(*CAPPED)
    valid = (PACKED != 0)[:, :, None, None]
    mask = AttentionMask(jnp.asarray(PACKED), jnp.asarray(PACKED), 0, window)
    out = attention.reference(q, k, v, mask, logit_softcap=SOFTCAP)
    want = _numpy_attention(q, k, v, PACKED, PACKED, window, SOFTCAP)
    np.testing.assert_allclose(np.where(valid, out, 0), want, atol=1e-5)
    # The cap bites on these scores: without it the output is far off.
    uncapped = _numpy_attention(q, k, v, PACKED, PACKED, window, None)
    assert np.abs(uncapped - want).max() > 0.1


# cudnn has no soft-cap, so with one it runs blockwise: on CPU too.
@pytest.mark.parametrize("name,opts", CPU_BACKENDS + [("cudnn", {"block_q": 8, "block_k": 4})],
                         ids=["blockwise-4x8", "blockwise-8x4", "xla", "cudnn"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_softcapped_backends_match_the_reference(name, opts, window):
    _assert_matches_reference(name, CAPPED, PACKED, PACKED, window=window, logit_softcap=SOFTCAP, **opts)


@pytest.mark.parametrize("name", ["blockwise", "splash"])
def test_softcapped_decode_matches_the_reference(name):
    # A traced cache offset (splash runs blockwise), key blocks skipped before and after the queries.
    _assert_matches_reference(name, (2, 4, 32, 4, 2, 8, 1, 4.0), CACHE[:, 20:24], CACHE,
                              q_offset=jnp.int32(20), window=5, logit_softcap=SOFTCAP, block_q=4, block_k=8)


def _single(q, k, v, mask, block_q=None, block_k=None, logit_softcap=None):
    """single_query on the cache's heads-major layout ([B, K, S, D])."""
    return attention.single_query(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, logit_softcap=logit_softcap)


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (5, SOFTCAP)], ids=["full", "window", "capped"])
def test_single_query_decode_matches_the_reference(window, softcap):
    # One query a row at slot 23 of the cache: row 1's is padding (a finished row).
    _assert_matches_reference(_single, (2, 1, 32, 4, 2, 8, 1, 4.0 if softcap else 1.0), CACHE[:, 23:24], CACHE,
                              q_offset=jnp.int32(23), window=window, logit_softcap=softcap)


@pytest.mark.parametrize("offset", [3, 7, 8, 16, 23, 31])
@pytest.mark.parametrize("traced", [True, False], ids=["traced", "static"])
def test_single_query_reads_the_filled_prefix_and_matches_the_reference(offset, traced):
    """A decode step attends to the first n keys for the smallest compiled n above its index
    (blocks of 8 here: 8 / 16 / 24 / 32), a branch of a switch when the index is traced; offsets
    on both sides of each boundary, a window and a cap match the reference over the whole cache."""
    def prefixed(q, k, v, mask, block_q=None, block_k=None, logit_softcap=None):
        return attention.single_query(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask,
                                      logit_softcap=logit_softcap, prefix_block=8)

    q_offset = jnp.int32(offset) if traced else offset
    _assert_matches_reference(prefixed, (2, 1, 32, 4, 2, 8, 1, 4.0), CACHE[:, offset:offset + 1], CACHE,
                              q_offset=q_offset, window=5, logit_softcap=SOFTCAP)
    q, k, v, _ = _qkv(2, 1, 32, 4, 2, 8, 1)
    mask = AttentionMask(jnp.asarray(CACHE[:, offset:offset + 1]), jnp.asarray(CACHE), q_offset)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: prefixed(q, k, v, mask))(q, k, v))
    assert ("cond[" in jaxpr) == traced and attention.prefix_lengths(32, 8) == [8, 16, 24, 32]
    if traced:
        assert jaxpr.count("branches=(") == 1 and jaxpr.count("{ lambda") >= 4  # one switch, four prefixes


def test_attend_runs_one_query_rows_without_blocks_and_with_sinks():
    """L == 1 goes to single_query under any implementation but reference (no key-block loop in
    the program); with sinks it equals the reference's sink softmax."""
    q, k, v, _ = _qkv(2, 1, 32, 4, 2, 8, 1)
    seg = dict(q_segment_ids_BL=jnp.asarray(CACHE[:, 22:23]), kv_segment_ids_BS=jnp.asarray(CACHE), q_offset=22)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0])
    ref = BACKENDS["reference"](q, k, v, AttentionMask(seg["q_segment_ids_BL"], seg["kv_segment_ids_BS"], 22),
                                sinks_H=sinks)
    for implementation in ("blockwise", "xla", "auto"):
        run = functools.partial(attend, implementation=implementation, **seg)
        assert "while" not in str(jax.make_jaxpr(run)(q, k, v)), implementation
        np.testing.assert_allclose(run(q, k, v, sinks_H=sinks), ref, atol=ATOL, err_msg=implementation)


def _via_attend(implementation):
    """`attend` with a backend's signature: under a "sequence" mesh it splits per shard."""
    def run(q, k, v, mask, **opts):
        return attend(q, k, v, q_segment_ids_BL=mask.q_segment_ids_BL, kv_segment_ids_BS=mask.kv_segment_ids_BS,
                      q_offset=mask.q_offset, sliding_window=mask.sliding_window, implementation=implementation,
                      **opts)
    return run


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_softcap_reaches_every_context_parallel_shard(implementation):
    # 20 tokens over 4 sequence shards of 5 queries: each shard's call must carry the cap.
    with jax.set_mesh(make_mesh(data=2, sequence=4)):
        _assert_matches_reference(_via_attend(implementation), CAPPED, PACKED, PACKED, window=3,
                                  logit_softcap=SOFTCAP, block_q=4, block_k=8)


def test_blockwise_never_holds_the_score_matrix():
    # The point of blockwise: a 2,048-token backward needs less scratch than one [L, S] f32
    # score matrix per head (the reference keeps several). Compiled, not run.
    B, L, H, K, D = 1, 2048, 2, 1, 16
    spec = jax.ShapeDtypeStruct

    def temp_bytes(name):
        def loss(q, k, v, seg):
            return jnp.sum(BACKENDS[name](q, k, v, AttentionMask(seg, seg)))

        args = (spec((B, L, H, D), jnp.float32), spec((B, L, K, D), jnp.float32),
                spec((B, L, K, D), jnp.float32), spec((B, L), jnp.int32))
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = B * H * L * L * 4
    assert temp_bytes("blockwise") < scores / 8
    assert temp_bytes("reference") > scores


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_attend_returns_queries_dtype(implementation):
    q, k, v, _ = _qkv(2, 20, 20, 4, 2)
    seg = jnp.asarray(PACKED)
    out = attend(q.astype(jnp.bfloat16), k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg,
                 sliding_window=3, implementation=implementation)
    ref = attend(q, k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg, sliding_window=3,
                 implementation="reference")
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    valid = (PACKED != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out.astype(jnp.float32), 0), np.where(valid, ref, 0), atol=0.1)


def test_resolve_picks_per_platform_and_rejects_unknown_names():
    assert resolve("auto", "tpu") == "splash"
    assert resolve("auto", "gpu") == "cudnn"
    assert resolve("auto", "cpu") == "blockwise"
    assert resolve("auto") == "blockwise"  # these tests run on CPU
    assert all(resolve(name, "tpu") == name for name in BACKENDS)
    # cudnn cannot run here: it is the xla call (tested above) with another kernel string.
    assert BACKENDS["cudnn"].func is BACKENDS["xla"].func
    assert BACKENDS["cudnn"].keywords == {"implementation": "cudnn"}
    with pytest.raises(ValueError, match="model.attention='flash'") as err:
        resolve("flash")
    assert all(name in str(err.value) for name in BACKENDS)
    q, k, v, _ = _qkv(1, 4, 4, 2, 1)
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="model.attention"):
        attend(q, k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg, implementation="flash")


def test_attend_rejects_a_negative_or_traced_softcap():
    q, k, v, _ = _qkv(1, 4, 4, 2, 1)
    seg = jnp.ones((1, 4), jnp.int32)
    run = functools.partial(attend, q, k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg)
    with pytest.raises(ValueError, match="logit_softcap"):
        run(logit_softcap=-5.0)
    with pytest.raises(ValueError, match="logit_softcap"):  # the kernels take it as a constant
        jax.jit(lambda cap: run(logit_softcap=cap))(5.0)
    np.testing.assert_array_equal(run(logit_softcap=0), run())  # 0: no cap, like sliding_window
