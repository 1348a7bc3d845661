"""Grouped matmuls for dropless experts: rows grouped by expert, each group times its expert's
kernel, every row computed whatever the sizes of the groups.

Two layouts of the T * K (token, expert) pairs, one matmul each:
  "ragged": the pairs sorted by expert, one `jax.lax.ragged_dot` (TPU and GPU, where XLA has a
    grouped-matmul emitter);
  "blocks": the pairs sorted by expert with each expert's group padded to whole blocks of
    `block` rows, one dense [block, E] x [E, F] matmul per block in a `lax.scan` (CPU, where
    XLA lowers `ragged_dot` as a masked dense matmul per group: at the `moe_bench` shape, 8
    experts, it ran 5x slower than these blocks). The blocks' backward is its own scan, which
    adds each block's kernel gradient into its expert's slice in place.
tokamax's `ragged_dot` has TPU and GPU kernels and falls back to XLA's on CPU, so the CPU layout
is written here. Padding rows hold no pair: they read zeros and are dropped when combined.

Axis letters: T tokens, K experts per token, X experts, P rows, N blocks, B rows per block,
E input width, F output width.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft.errors import ConfigError


class ExpertRows(NamedTuple):
    """The pairs laid out as rows grouped by expert.

    pair_at: [P] the flat (token * K + k) pair each row holds; T * K on an empty padding row.
    groups: what the layout's matmul reads: "ragged" the rows of each expert [X], "blocks"
    the expert of each block [N]."""

    pair_at: jax.Array
    groups: jax.Array


def _sorted(experts_TK: jax.Array, num_experts: int):
    flat = experts_TK.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # by expert, in token order within one
    return flat, order, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def ragged_rows(experts_TK: jax.Array, num_experts: int) -> ExpertRows:
    """The pairs sorted by expert, no padding: P = T * K."""
    _, order, sizes_X = _sorted(experts_TK, num_experts)
    return ExpertRows(order, sizes_X)


def block_size(num_pairs: int, num_experts: int, *, largest: int = 256) -> int:
    """Rows per block: the power of two nearest the mean group size, 8 to `largest`; padding
    adds at most num_experts * (block - 1) rows."""
    mean = max(num_pairs // num_experts, 1)
    return int(min(max(8, 1 << (mean.bit_length() - 1)), largest))


def block_rows(experts_TK: jax.Array, num_experts: int, block: int | None = None) -> ExpertRows:
    """The pairs sorted by expert, each expert's rows padded to whole blocks. The number of
    blocks is static, ceil(T * K / block) + X, enough for any routing; blocks past the last
    expert's carry the expert id X and are skipped by `block_matmul`. Pairs whose expert is
    >= num_experts (expert parallelism's padding rows) get no row, as `ragged_dot` leaves
    rows past its groups."""
    flat, order, sizes_X = _sorted(experts_TK, num_experts)
    M = flat.shape[0]
    block = block or block_size(M, num_experts)
    padded_X = (sizes_X + block - 1) // block * block
    ends_X = jnp.cumsum(padded_X)
    expert_M = flat[order]  # each sorted pair's expert
    slot_M = (ends_X - padded_X)[expert_M] + jnp.arange(M, dtype=jnp.int32) - (jnp.cumsum(sizes_X) - sizes_X)[expert_M]
    N = -(-M // block) + num_experts
    slot_M = jnp.where(expert_M < num_experts, slot_M, N * block)
    pair_at = jnp.full((N * block,), M, jnp.int32).at[slot_M].set(order, mode="drop")
    # past the last expert's blocks: num_experts, which `block_matmul` skips
    expert_N = jnp.searchsorted(ends_X, jnp.arange(N, dtype=jnp.int32) * block, side="right")
    return ExpertRows(pair_at, expert_N.astype(jnp.int32))


def ragged_matmul(x_PE: jax.Array, w_XEF, sizes_X: jax.Array):
    """x times each row's expert's kernel, by `jax.lax.ragged_dot`: [P, F]; a tuple of kernels
    gives a tuple of outputs."""
    if isinstance(w_XEF, tuple):
        return tuple(jax.lax.ragged_dot(x_PE, w, sizes_X) for w in w_XEF)
    return jax.lax.ragged_dot(x_PE, w_XEF, sizes_X)


def _used_blocks(expert_N: jax.Array, num_experts: int) -> jax.Array:
    """How many leading blocks hold rows: the others carry the expert id `num_experts`."""
    return jnp.sum(expert_N < num_experts)


def block_matmul(x_PE: jax.Array, w_XEF, expert_N: jax.Array):
    """Rows in blocks of P / N, block n times w[expert_N[n]]: [P, F] in x's dtype. Blocks whose
    expert is X (past the last expert's, `block_rows`) are skipped and give zeros. A tuple of
    kernels [X, E, F_i] (gate and up, which read the same rows) runs in one loop over the
    blocks and gives a tuple of outputs."""
    if isinstance(w_XEF, tuple):
        return _blocks(x_PE, w_XEF, expert_N)
    return _blocks(x_PE, (w_XEF,), expert_N)[0]


def _by_block(x_PE, expert_N):
    """x as [N, B, E] blocks."""
    return x_PE.reshape(expert_N.shape[0], -1, x_PE.shape[-1])


def _dot(a, b, contract=((1,), (0,))):
    """a @ b (or another contraction) of two arrays of the compute dtype, accumulated and
    returned in float32. On XLA:CPU a bfloat16 x bfloat16 -> float32 dot runs on the CPU's
    bfloat16 instructions (2-4x the float32 dot's speed at a [256, 256] x [256, 512] block);
    the loops' outputs stay float32, since writing a bfloat16 block into a loop's stacked output
    makes XLA:CPU convert the whole [N, B, F] buffer to float32 and back on every block."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):  # a @ b.T
    return _dot(a, b, ((1,), (1,)))


def _dot_t(a, b):  # a.T @ b
    return _dot(a, b, ((0,), (0,)))


def _add_at(dw_XEF, e, dw_EF):
    """dw[e] += dw_EF, in place in a loop."""
    return jax.lax.dynamic_update_index_in_dim(dw_XEF, dw_XEF[e] + dw_EF, e, 0)


@jax.custom_vjp
def _blocks(x_PE: jax.Array, ws: tuple, expert_N: jax.Array) -> tuple:
    X, N = ws[0].shape[0], expert_N.shape[0]
    x_NBE = _by_block(x_PE, expert_N)
    ws = tuple(w.astype(x_PE.dtype) for w in ws)

    def body(n, ys):
        x_BE, e = x_NBE[n], expert_N[n]
        return tuple(jax.lax.dynamic_update_index_in_dim(y, _dot(x_BE, w[e]), n, 0) for y, w in zip(ys, ws))

    ys = tuple(jnp.zeros((N, x_NBE.shape[1], w.shape[-1]), jnp.float32) for w in ws)
    ys = jax.lax.fori_loop(0, _used_blocks(expert_N, X), body, ys)
    return tuple(y.reshape(x_PE.shape[0], -1).astype(x_PE.dtype) for y in ys)


def _blocks_fwd(x_PE, ws, expert_N):
    return _blocks(x_PE, ws, expert_N), (x_PE, ws, expert_N)


def _blocks_bwd(residuals, dys):
    """dx per block against its expert's kernels; dw accumulated per expert in float32 (a
    block's x^T dy added to its expert's slice in place), cast to the kernels' dtype at the end.
    Only the used blocks run; the others' dx stay zeros."""
    x_PE, ws, expert_N = residuals
    X, dtype = ws[0].shape[0], x_PE.dtype
    x_NBE = _by_block(x_PE, expert_N)
    dys = tuple(_by_block(dy.astype(dtype), expert_N) for dy in dys)
    wc = tuple(w.astype(dtype) for w in ws)

    def body(n, carry):
        dx_NBE, dws = carry
        e, x_BE = expert_N[n], x_NBE[n]
        dx_BE = sum(_t_dot(dy[n], w[e]) for dy, w in zip(dys, wc))
        dws = tuple(_add_at(dw, e, _dot_t(x_BE, dy[n])) for dw, dy in zip(dws, dys))
        return jax.lax.dynamic_update_index_in_dim(dx_NBE, dx_BE, n, 0), dws

    init = (jnp.zeros(x_NBE.shape, jnp.float32), tuple(jnp.zeros(w.shape, jnp.float32) for w in ws))
    dx_NBE, dws = jax.lax.fori_loop(0, _used_blocks(expert_N, X), body, init)
    return dx_NBE.reshape(x_PE.shape).astype(dtype), tuple(dw.astype(w.dtype) for dw, w in zip(dws, ws)), None


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def block_mlp(x_PE: jax.Array, gate_XEF, up_XEF, down_XFE, expert_N: jax.Array, activation):
    """The whole gated MLP of each row's expert, act(x @ gate) * up @ down, over the rows in
    blocks of P / N (`block_rows`), in one loop: [P, E] in x's dtype. Blocks of expert X are
    skipped and give zeros. activation: an elementwise function (`parts.ACTIVATIONS`).

    One loop instead of `block_matmul`'s two: the [B, F] hidden block stays in the loop (float32,
    cast to x's dtype for the down projection, as the unfused MLP's hidden units are) rather than
    two [P, F] buffers written, converted and read back whole. Its backward is one loop too,
    which recomputes each block's gate and up (nothing [P, F] is kept between the passes) and
    adds each block's kernel gradients into its expert's slices in place."""
    return _block_mlp(x_PE, (gate_XEF, up_XEF, down_XFE), expert_N, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _block_mlp(x_PE, ws, expert_N, act):
    X, dtype = ws[0].shape[0], x_PE.dtype
    x_NBE = _by_block(x_PE, expert_N)
    wg, wu, wd = (w.astype(dtype) for w in ws)

    def body(n, y_NBE):
        e = expert_N[n]
        x_BE = x_NBE[n]
        h = act(_dot(x_BE, wg[e])) * _dot(x_BE, wu[e])
        return jax.lax.dynamic_update_index_in_dim(y_NBE, _dot(h.astype(dtype), wd[e]), n, 0)

    y_NBE = jax.lax.fori_loop(0, _used_blocks(expert_N, X), body, jnp.zeros(x_NBE.shape, jnp.float32))
    return y_NBE.reshape(x_PE.shape).astype(dtype)


def _block_mlp_fwd(x_PE, ws, expert_N, act):
    return _block_mlp(x_PE, ws, expert_N, act), (x_PE, ws, expert_N)


def _block_mlp_bwd(act, residuals, dy_PE):
    """Per block, in the transposed space: XLA:CPU runs a dot that contracts both operands'
    leading axis (x^T dy, for a kernel's gradient) at a third of the speed of x @ w or
    x @ w^T, so the loop computes the hidden block transposed ([F, B]: gate^T = gate_kernel^T
    x^T), which makes every kernel gradient (h^T dy, g^T x) and dx^T (= gate_kernel dg^T + ...)
    a plain product; dx and the gate / up gradients are transposed back once after the loop."""
    x_PE, ws, expert_N = residuals
    X, dtype = ws[0].shape[0], x_PE.dtype
    x_NBE = _by_block(x_PE, expert_N)
    dy_NBE = _by_block(dy_PE.astype(dtype), expert_N)
    wg, wu, wd = (w.astype(dtype) for w in ws)
    wg_T, wu_T = jnp.swapaxes(wg, 1, 2), jnp.swapaxes(wu, 1, 2)  # [X, F, E]

    def body(n, carry):
        dx_NEB, (dwg_T, dwu_T, dwd) = carry
        e, x_BE, dy_BE = expert_N[n], x_NBE[n], dy_NBE[n]
        h_FB, hidden_vjp = jax.vjp(lambda g, u: act(g) * u, _t_dot(wg_T[e], x_BE), _t_dot(wu_T[e], x_BE))
        dwd = _add_at(dwd, e, _dot(h_FB.astype(dtype), dy_BE))
        dg_FB, du_FB = (d.astype(dtype) for d in hidden_vjp(_t_dot(wd[e], dy_BE)))
        dx_EB = _dot(wg[e], dg_FB) + _dot(wu[e], du_FB)
        dwg_T, dwu_T = _add_at(dwg_T, e, _dot(dg_FB, x_BE)), _add_at(dwu_T, e, _dot(du_FB, x_BE))
        return jax.lax.dynamic_update_index_in_dim(dx_NEB, dx_EB, n, 0), (dwg_T, dwu_T, dwd)

    N, B, E = x_NBE.shape
    init = (jnp.zeros((N, E, B), jnp.float32), tuple(jnp.zeros(w.shape, jnp.float32) for w in (wg_T, wu_T, wd)))
    dx_NEB, (dwg_T, dwu_T, dwd) = jax.lax.fori_loop(0, _used_blocks(expert_N, X), body, init)
    dx_PE = jnp.swapaxes(dx_NEB, 1, 2).reshape(x_PE.shape).astype(dtype)
    dws = (jnp.swapaxes(dwg_T, 1, 2), jnp.swapaxes(dwu_T, 1, 2), dwd)
    return dx_PE, tuple(dw.astype(w.dtype) for dw, w in zip(dws, ws)), None


_block_mlp.defvjp(_block_mlp_fwd, _block_mlp_bwd)


_GMM_TILE = 128  # rows a tile of the Pallas grouped matmul (megablox `gmm`)


def _free_axes() -> tuple[str, ...]:
    """The ambient mesh's axes not yet manual (a Mosaic kernel must run where all are)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return ()
    return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def _row_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in _free_axes())


def gmm_rows(experts_TK: jax.Array, num_experts: int) -> ExpertRows:
    """The pairs sorted by expert, no padding between groups; P = T * K rounded up to whole
    row tiles on each of the devices `gmm_matmul` splits the rows over; the rows past the
    groups are empty (pair T * K)."""
    _, order, sizes_X = _sorted(experts_TK, num_experts)
    M = order.shape[0]
    P = -(-M // (_GMM_TILE * _row_shards())) * _GMM_TILE * _row_shards()
    # pairs of an expert >= num_experts (expert parallelism's padding) sort last, past the groups
    pair_at = jnp.where(jnp.arange(M) < jnp.sum(sizes_X), order, M)
    return ExpertRows(jnp.pad(pair_at, (0, P - M), constant_values=M), sizes_X)


def _gmm_tiling(k: int, n: int) -> tuple[int, int, int]:
    """(rows, contraction, output) tile sizes: 128-multiples up to 512 / 1024, as MaxText tiles
    megablox (a width past the last whole tile is masked by the kernel)."""
    def tile(d, largest):
        return min(largest, d // 128 * 128)
    return _GMM_TILE, tile(k, 512), tile(n, 1024)


def _gmm_local(x_PE, w_XEF, sizes_X, interpret):
    """One device's rows: megablox `gmm` (custom VJP: `gmm` for dx, `tgmm` for dw), the rows
    past the groups (which it leaves unwritten) zeroed."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # Pallas TPU: imported when used

    y_PF = gmm(x_PE, w_XEF.astype(x_PE.dtype), sizes_X, x_PE.dtype,
               _gmm_tiling(x_PE.shape[-1], w_XEF.shape[-1]), interpret=interpret)
    rows = jnp.arange(x_PE.shape[0])[:, None] < jnp.sum(sizes_X)
    return jnp.where(rows, y_PF, jnp.zeros((), y_PF.dtype))


def gmm_matmul(x_PE: jax.Array, w_XEF, sizes_X: jax.Array, *, interpret: bool = False):
    """x times each row's expert's kernel by the TPU Pallas grouped matmul (megablox): [P, F]
    in x's dtype; a tuple of kernels gives a tuple. Rows past the groups are zeros. Widths that
    are not multiples of 128 (the kernel's lane tile) take `jax.lax.ragged_dot` instead.

    A Mosaic kernel cannot be partitioned by XLA, so under a mesh it runs in a `shard_map`
    over the axes not already manual: each device takes a contiguous slice of the sorted rows
    (P / devices, whole tiles) and the groups' sizes within it, and the whole kernels (FSDP's
    all-gather; their gradients summed back). interpret: Pallas interpret mode (CPU tests)."""
    if isinstance(w_XEF, tuple):
        return tuple(gmm_matmul(x_PE, w, sizes_X, interpret=interpret) for w in w_XEF)
    if x_PE.shape[-1] % 128 or w_XEF.shape[-1] % 128:  # Mosaic tiles lanes by 128 (tiny test models)
        return ragged_matmul(x_PE, w_XEF, sizes_X)
    free = _free_axes()
    if not free:
        return _gmm_local(x_PE, w_XEF, sizes_X, interpret)

    def local(x_PE, w_XEF, sizes_X):  # this device's rows [start, start + m)
        m = x_PE.shape[0]
        start = jax.lax.axis_index(free) * m
        ends_X = jnp.cumsum(sizes_X)
        inside_X = jnp.clip(ends_X - start, 0, m) - jnp.clip(ends_X - sizes_X - start, 0, m)
        return _gmm_local(x_PE, w_XEF, inside_X.astype(jnp.int32), interpret)

    rows = P(free)
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(rows, P(), P()), out_specs=rows,
                         axis_names=set(free), check_vma=False)(x_PE, w_XEF, sizes_X)


# layout name -> (rows of the pairs, the grouped matmul over them)
LAYOUTS = {
    "ragged": (ragged_rows, ragged_matmul),
    "blocks": (block_rows, block_matmul),
    "gmm": (gmm_rows, gmm_matmul),
}
# "auto" by platform: the blocks on CPU (XLA:CPU lowers `ragged_dot` as a masked dense matmul
# per group), the Pallas kernel on TPU, XLA's grouped matmul on GPU.
_AUTO = {"cpu": "blocks", "tpu": "gmm"}


def resolve(name: str = "auto", platform: str | None = None) -> str:
    """The layout for `name` ("auto" or a key of LAYOUTS) on `platform` (default: the local
    backend): "auto" is "blocks" on CPU, "gmm" on TPU, "ragged" elsewhere."""
    if name == "auto":
        return _AUTO.get(platform or jax.default_backend(), "ragged")
    if name not in LAYOUTS:
        raise ConfigError(f"model.moe_matmul={name!r} is not a grouped-matmul layout; use one of: auto, "
                          f"{', '.join(LAYOUTS)}")
    return name


def layout(name: str | None = None):
    """(rows, matmul) of a layout (`LAYOUTS`; None or "auto": `resolve`'s pick here)."""
    return LAYOUTS[resolve(name or "auto")]
