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

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
    expert's are empty (they compute zeros with the last expert's kernel). Pairs whose expert is
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
    expert_N = jnp.searchsorted(ends_X, jnp.arange(N, dtype=jnp.int32) * block, side="right")
    return ExpertRows(pair_at, jnp.minimum(expert_N, num_experts - 1).astype(jnp.int32))


def ragged_matmul(x_PE: jax.Array, w_XEF: jax.Array, sizes_X: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x_PE, w_XEF, sizes_X)


@jax.custom_vjp
def block_matmul(x_PE: jax.Array, w_XEF: jax.Array, expert_N: jax.Array) -> jax.Array:
    """Rows in blocks of P / N, block n times w[expert_N[n]]: [P, F]."""
    N = expert_N.shape[0]
    x_NBE = x_PE.reshape(N, -1, x_PE.shape[-1])
    _, y_NBF = jax.lax.scan(lambda _, xs: (None, xs[0] @ w_XEF[xs[1]]), None, (x_NBE, expert_N))
    return y_NBF.reshape(x_PE.shape[0], -1)


def _block_matmul_fwd(x_PE, w_XEF, expert_N):
    return block_matmul(x_PE, w_XEF, expert_N), (x_PE, w_XEF, expert_N)


def _block_matmul_bwd(residuals, dy_PF):
    """dx per block against its expert's kernel; dw accumulated per expert in float32 (a block's
    x^T dy added to its expert's slice in place), cast to the kernel's dtype at the end."""
    x_PE, w_XEF, expert_N = residuals
    N = expert_N.shape[0]

    def body(dw_XEF, xs):
        x_BE, dy_BF, e = xs
        dx_BE = dy_BF @ w_XEF[e].T
        update = dw_XEF[e] + jnp.einsum("BE,BF->EF", x_BE, dy_BF, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw_XEF, update, e, 0), dx_BE

    dw_XEF, dx_NBE = jax.lax.scan(body, jnp.zeros(w_XEF.shape, jnp.float32),
                                  (x_PE.reshape(N, -1, x_PE.shape[-1]), dy_PF.reshape(N, -1, dy_PF.shape[-1]),
                                   expert_N))
    return dx_NBE.reshape(x_PE.shape), dw_XEF.astype(w_XEF.dtype), None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


# layout name -> (rows of the pairs, the grouped matmul over them)
LAYOUTS = {
    "ragged": (ragged_rows, ragged_matmul),
    "blocks": (block_rows, block_matmul),
}


def default_layout() -> str:
    """"blocks" on CPU, "ragged" where XLA has a grouped-matmul emitter (TPU, GPU)."""
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


def layout(name: str | None = None):
    """(rows, matmul) of a layout (`LAYOUTS`; None: `default_layout()`)."""
    return LAYOUTS[name or default_layout()]
