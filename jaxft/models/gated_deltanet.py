"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention): its math as pure JAX functions.

Legend: B batch, T time, C conv channels, W conv width, G query/key heads, H value heads
(a multiple of G: each q/k head serves H // G consecutive value heads, as HF's
repeat_interleave), K key head dim, V value head dim, N chunks, L chunk length.

Per value head the state S [K, V] (HF's orientation) follows the gated delta rule (Yang et al.,
"Gated Delta Networks", 2024):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t
with q, k l2-normalized and q scaled by K**-0.5. `gated_delta_rule_reference` runs it a step at
a time (decoding, and the tests' oracle); `gated_delta_rule` runs it a chunk at a time: within a
chunk the L delta-rule updates are folded by the WY / UT transform into the inverse of one
unit-lower-triangular [L, L] matrix and a few matmuls, and a `lax.scan` over chunks carries S,
so cost and memory are linear in T.

Packed rows (`segment_ids` [B, T], 0 = padding): the state starts from zero at each segment
start (a nonzero id differing from the last nonzero id before it), so a packed row equals its
segments run alone; padding neither reads nor writes the state (its output is 0) and the state
carries across it unchanged. A row's first segment is no segment start: it continues
`initial_state`, so a row split in two, the second half given the first's final state, equals
the whole. `causal_conv1d` follows the same rule for its window of past inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ACTIVATIONS = {"silu": jax.nn.silu, None: lambda x: x}
DEFAULT_CHUNK = 32  # `gated_delta_rule`'s chunk_size (why 32: its docstring)


def run_ids(segment_ids, batch: int, length: int):
    """[B, T] int32 run index: +1 at every segment start, a nonzero id differing from the last
    nonzero id before it (the row's first segment continues the initial state; padding belongs to
    the run before it). Two positions may share state iff their run ids are equal."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [B, T] = {(batch, length)}")
    s = jnp.asarray(segment_ids, jnp.int32)
    position = jnp.where(s != 0, jnp.arange(length, dtype=jnp.int32)[None], -1)
    last = jax.lax.cummax(position, axis=1)  # the last nonzero position up to t (-1: none yet)
    previous = jnp.take_along_axis(s, jnp.maximum(last[:, :-1], 0), axis=1)
    starts = (s[:, 1:] != 0) & (last[:, :-1] >= 0) & (s[:, 1:] != previous)
    return jnp.pad(jnp.cumsum(starts, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))


def causal_conv1d(x, weight, *, segment_ids=None, window=None, activation="silu"):
    """Depthwise causal convolution over time, y_t = act(sum_i weight[i] x_{t-W+1+i}).

    x [B, T, C]; weight [W, C] (HF's conv1d.weight [C, 1, W] transposed); segment_ids [B, T] int
    (0 = padding, read as zeros, as HF zeroes padding before its conv; a position never reads
    inputs from before its segment's start); window
    [B, W-1, C]: the W-1 inputs before x (the generation cache; None = zeros), read by the first
    segment only. Accumulates in float32. Returns (y [B, T, C] in x's dtype, new_window
    [B, W-1, C] = the last W-1 inputs of window ++ x).
    """
    B, T, C = x.shape
    W = weight.shape[0]
    if weight.shape != (W, C):
        raise ValueError(f"conv weight has shape {weight.shape}; expected [W, C] with C = {C}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv activation {activation!r}: choose from {', '.join(map(str, ACTIVATIONS))}")
    if window is None:
        window = jnp.zeros((B, W - 1, C), x.dtype)
    if segment_ids is not None:
        x = jnp.where((jnp.asarray(segment_ids) != 0)[..., None], x, 0)
    full = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    runs = run_ids(segment_ids, B, T)
    runs_full = jnp.pad(runs, ((0, 0), (W - 1, 0)))  # the window continues run 0
    y = jnp.zeros((B, T, C), jnp.float32)
    for i in range(W):  # tap i reads the input W-1-i steps back
        same_run = (runs_full[:, i:i + T] == runs)[..., None]
        y = y + jnp.where(same_run, full[:, i:i + T].astype(jnp.float32), 0.0) * weight[i].astype(jnp.float32)[None, None]
    return ACTIVATIONS[activation](y).astype(x.dtype), full[:, T:]


def _l2norm(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _check_shapes(q, k, v, g, beta):
    B, T, G, _ = q.shape
    H = v.shape[2]
    if k.shape != q.shape or v.shape[:2] != (B, T) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"gated delta rule shapes: q {q.shape}, k {k.shape} [B, T, G, K]; v {v.shape} [B, T, H, V]; "
                         f"g {g.shape}, beta {beta.shape} [B, T, H]")
    if H % G:
        raise ValueError(f"{H} value heads are not a multiple of {G} query/key heads")


def _normalize(q, k, l2_normalize):
    """q, k [..., K] -> float32, l2-normalized (if asked), q scaled by K**-0.5."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if l2_normalize:
        q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k


def _gates(g, beta, segment_ids):
    """float32 g, beta [B, T, H], zeroed on padding (so it leaves the state as it is); valid [B, T]; run ids [B, T]."""
    B, T, _ = g.shape
    valid = jnp.ones((B, T), bool) if segment_ids is None else jnp.asarray(segment_ids) != 0
    g = jnp.where(valid[..., None], g.astype(jnp.float32), 0.0)
    beta = jnp.where(valid[..., None], beta.astype(jnp.float32), 0.0)
    return g, beta, valid, run_ids(segment_ids, B, T)


def _initial_state(initial_state, B, H, K, V):
    if initial_state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    if initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state has shape {initial_state.shape}; expected [B, H, K, V] = {(B, H, K, V)}")
    return initial_state.astype(jnp.float32)


def gated_delta_rule_reference(q, k, v, g, beta, *, segment_ids=None, initial_state=None, l2_normalize=True):
    """The gated delta rule a step at a time (`lax.scan` over T): decoding and the tests' oracle.

    q, k [B, T, G, K]; v [B, T, H, V]; g [B, T, H] log decay (<= 0); beta [B, T, H];
    segment_ids [B, T] (0 = padding); initial_state [B, H, K, V] or None. Returns
    (out [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32).
    """
    B, T, _, K = q.shape
    H, V = v.shape[2:]
    out_dtype = q.dtype
    _check_shapes(q, k, v, g, beta)
    q, k = (jnp.repeat(x, H // x.shape[2], axis=2) for x in _normalize(q, k, l2_normalize))  # [B, T, H, K]
    g, beta, valid, runs = _gates(g, beta, segment_ids)
    v = v.astype(jnp.float32)
    starts = jnp.pad(runs[:, 1:] != runs[:, :-1], ((0, 0), (1, 0)))

    def step(S, x):  # S [B, H, K, V]
        q_t, k_t, v_t, g_t, beta_t, start, ok = x
        S = jnp.where(start[:, None, None, None], 0.0, S)
        S = S * jnp.exp(g_t)[..., None, None]
        delta = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t[..., :, None] * delta[..., None, :]
        o = jnp.where(ok[:, None, None], jnp.einsum("bhkv,bhk->bhv", S, q_t), 0.0)
        return S, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, starts, valid))
    # checkpointed: its backward keeps one state a step (B H K V floats), not every intermediate
    S, out = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), _initial_state(initial_state, B, H, K, V), xs)
    return jnp.moveaxis(out, 0, 1).astype(out_dtype), S


def _unit_lower_inverse(N, leaf: int = 16):
    """(I + N)^-1 for strictly lower triangular N [..., L, L], by halves,
        [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]],
    down to blocks of `leaf`, where N is nilpotent: (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...
    Matmuls only (XLA:CPU runs a batched triangular solve 4x slower); about L^2 (L/3 + 6 leaf) flops."""
    L = N.shape[-1]
    if L > leaf:
        h = L // 2
        top, bottom = _unit_lower_inverse(N[..., :h, :h], leaf), _unit_lower_inverse(N[..., h:, h:], leaf)
        corner = -bottom @ (N[..., h:, :h] @ top)
        zeros = jnp.zeros(N.shape[:-2] + (h, L - h), N.dtype)
        return jnp.concatenate([jnp.concatenate([top, zeros], -1), jnp.concatenate([corner, bottom], -1)], -2)
    M = -N
    inverse = jnp.eye(L, dtype=N.dtype).reshape((1,) * (N.ndim - 2) + (L, L)) + M
    for _ in range(max(L - 1, 1).bit_length() - 1):
        M = M @ M
        inverse = inverse + inverse @ M
    return inverse


def _chunk_step(S, chunk, *, l2_normalize, out_dtype):
    """One chunk of one row from the state S [G, H // G, K, V] carried into it.

    chunk: q, k [L, G, K]; v [L, H, V]; g, beta [L, H] (float32); runs [L] (run ids); before []
    (the run of the position before the chunk). Normalized and laid out here, in cache, with the
    value heads grouped [G, H // G, ...] so that each q / k head's products are computed once.
    Returns (S after the chunk, out [L, H, V] in out_dtype).
    """
    q, k, v, g, beta, runs, before = chunk
    L, G, K = q.shape
    H, V = v.shape[1:]
    q, k = (jnp.swapaxes(x, 0, 1)[:, None] for x in _normalize(q, k, l2_normalize))  # [G, 1, L, K]
    v_beta = jnp.swapaxes(v.astype(jnp.float32) * beta[..., None], 0, 1).reshape(G, H // G, L, V)
    g, beta = (x.T.reshape(G, H // G, L) for x in (g, beta))
    runs = runs.reshape(1, 1, L)
    gamma = jnp.cumsum(g, axis=-1)  # log decay from the chunk's start
    keeps = (runs == before).astype(jnp.float32)  # still in the run the carried state belongs to
    causal = jnp.tril(jnp.ones((1, 1, L, L), bool))
    same = (runs[..., :, None] == runs[..., None, :]) & causal  # [1, 1, L, L]
    # D_ij = exp(gamma_i - gamma_j) within a run, j <= i; the inner where keeps exp finite (and its gradient)
    decay = jnp.where(same, jnp.exp(jnp.where(same, gamma[..., :, None] - gamma[..., None, :], 0.0)), 0.0)
    k_t = jnp.swapaxes(k, -1, -2)  # [G, 1, K, L]
    strictly_lower = jnp.tril(beta[..., :, None] * (k @ k_t) * decay, -1)
    k_read = k * (beta * jnp.exp(gamma) * keeps)[..., None]  # how each position reads S
    delta = _unit_lower_inverse(strictly_lower) @ (v_beta - k_read @ S)
    attn = (q @ k_t) * decay
    out = (q * (jnp.exp(gamma) * keeps)[..., None]) @ S + attn @ delta
    last = runs[..., -1:] == runs  # positions in the run the chunk ends in
    # the write weights scale delta's rows, not k^T's columns: a [K, L] operand scaled by columns
    # broadcast over the value heads cost XLA:CPU 15% of the forward
    write = jnp.where(last, jnp.exp(jnp.where(last, gamma[..., -1:] - gamma, 0.0)), 0.0)
    carry = (jnp.exp(gamma[..., -1:]) * keeps[..., -1:])[..., None]
    S = carry * S + k_t @ (delta * write[..., None])
    return S, jnp.swapaxes(out.reshape(H, L, V), 0, 1).astype(out_dtype)


def _rule_row(q, k, v, g, beta, runs, state, *, chunk_size, l2_normalize, out_dtype):
    """One row: q, k [T, G, K]; v [T, H, V]; g, beta [T, H] (float32); runs [T]; state [H, K, V].
    Returns (out [T, H, V], final state [H, K, V])."""
    T, H, V = v.shape
    L = min(chunk_size, T)
    N = -(-T // L)
    pad = [(0, N * L - T)]
    # padded positions continue the last run: they are inert (g = beta = 0, out sliced off)
    chunks = [jnp.pad(x, pad + [(0, 0)] * (x.ndim - 1)).reshape(N, L, *x.shape[1:]) for x in (q, k, v, g, beta)]
    runs = jnp.pad(runs, pad, mode="edge").reshape(N, L)
    before = jnp.pad(runs[:-1, -1], (1, 0))  # the run of the position before each chunk
    step = functools.partial(_chunk_step, l2_normalize=l2_normalize, out_dtype=out_dtype)
    step = jax.checkpoint(step, prevent_cse=False)
    G, K = q.shape[1:]
    # two chunks a loop step: XLA schedules across them (10-20% faster forward on CPU)
    state, out = jax.lax.scan(step, state.reshape(G, H // G, K, V), (*chunks, runs, before), unroll=min(2, N))
    return out.reshape(N * L, H, V)[:T], state.reshape(H, K, V)


def gated_delta_rule(q, k, v, g, beta, *, segment_ids=None, initial_state=None, chunk_size=DEFAULT_CHUNK,
                     l2_normalize=True):
    """The gated delta rule a chunk at a time: the same numbers as `gated_delta_rule_reference`.

    q, k [B, T, G, K]; v [B, T, H, V]; g [B, T, H] log decay (<= 0); beta [B, T, H];
    segment_ids [B, T] (0 = padding); initial_state [B, H, K, V] or None; T any length (the last
    chunk is padded with positions that leave the state as it is). Computes in float32; returns
    (out [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32).

    Within a chunk, with gamma_i = sum of g over the chunk up to i and D_ij = exp(gamma_i - gamma_j)
    for j <= i in the same run (0 otherwise), the corrections delta_i written to the state solve
        (I + strictly_lower(beta_i k_i.k_j D_ij)) delta = beta v - beta exp(gamma) k S_0
    (the WY / UT form), so a chunk costs a few matmuls with S_0:
        o = exp(gamma) q S_0 + (q k^T * D) delta,   S_L = exp(gamma_L) S_0 + (exp(gamma_L - gamma) k)^T delta.
    A `lax.scan` runs the chunks of a row (rows by `vmap`), each chunk whole inside the scan's
    body (under `jax.checkpoint`: the backward keeps one state per chunk) so its [L, L] and
    [L, D] intermediates stay in cache. Segment starts inside a chunk cut D and keep S_0 from the
    positions after them (masks, not a large negative g, so the cumulative sums lose no precision).
    chunk_size 32 ran forward + backward fastest on CPU at Qwen3.5's heads (`jaxft bench
    --gated-deltanet`, 2,048 to 8,192 tokens; the forward within noise of 16), and its backward
    keeps half 16's states: each chunk reads and writes the whole state, which small chunks do
    more often, and pays L^2 for its decay matrix and inverse, which large chunks pay more.
    Accelerators may prefer 64 (`model.linear_chunk_size`).
    """
    B, T, _, K = q.shape
    H, V = v.shape[2:]
    _check_shapes(q, k, v, g, beta)
    row = functools.partial(_rule_row, chunk_size=chunk_size, l2_normalize=l2_normalize, out_dtype=q.dtype)
    g, beta, valid, runs = _gates(g, beta, segment_ids)
    args = (q, k, v, g, beta, runs, _initial_state(initial_state, B, H, K, V))
    if B == 1:  # no vmap: its batched scan would lay each input out again, a whole extra copy
        out, state = (x[None] for x in row(*(x[0] for x in args)))
    else:
        out, state = jax.vmap(row)(*args)
    if segment_ids is not None:
        out = jnp.where(valid[..., None, None], out, 0)
    return out, state
