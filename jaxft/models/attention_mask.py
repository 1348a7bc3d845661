"""The one mask every attention backend applies (`jaxft.models.attention`'s docstring has the rule):
`AttentionMask`, the rule as booleans (`allowed`), and the finite fill for masked scores.

Axis letters as in decoder.py: B batch, L query length, S key length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

MASKED = float(np.finfo(np.float32).min)  # finite, so fully-masked rows stay NaN-free (as the decoder always did)


class AttentionMask(NamedTuple):
    """Who may attend to whom (the rule: `jaxft.models.attention`'s docstring).

    q_segment_ids_BL / kv_segment_ids_BS: int [B, L] / [B, S]; 0 = padding (never attended to).
    q_offset: index of the first query among the keys (KV-cache decoding); int or int32 scalar.
    sliding_window: None, or a query at index i sees keys j with i - j < sliding_window.
    """

    q_segment_ids_BL: jax.Array
    kv_segment_ids_BS: jax.Array
    q_offset: int | jax.Array = 0
    sliding_window: int | None = None


def allowed(q_seg_BL, kv_seg_BS, q_idx_L, k_idx_S, window) -> jax.Array:
    """[B, L, S] booleans: the mask rule for queries at indices q_idx_L against keys at k_idx_S."""
    allowed_LS = q_idx_L[:, None] >= k_idx_S[None, :]
    if window:
        allowed_LS &= q_idx_L[:, None] - k_idx_S[None, :] < window
    same_segment_BLS = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
    return allowed_LS[None] & same_segment_BLS & (kv_seg_BS[:, None, :] != 0)


def static_zero(x) -> bool:
    """True when q_offset is known at trace time to be 0 (not a traced cache index)."""
    return isinstance(x, (int, np.integer)) and int(x) == 0
