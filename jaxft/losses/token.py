"""Token-level losses: next-token log-probs, SFT loss, per-sequence reductions.

Pure `jax.numpy`: arrays in, arrays out; no model, no config, no Flax. The preference (DPO)
losses live beside this file in `preference.py`; both are public as `jaxft.losses.*`.

Axis legend: B rows, L sequence length, V vocabulary, E embedding width, S segments per row
(packed examples), P preference pairs.

Conventions shared with the data pipeline: batch arrays are int32 [B, L], right-padded;
`loss_mask[b, t] == 1` marks token t as a trained target; `segment_ids` 0 is padding and
1, 2, ... number the packed examples of a row. The model's output at position t predicts the
token at t + 1, so `shift_targets` turns (tokens, loss_mask) into per-position targets first.
"""

import jax
import jax.numpy as jnp

from jaxft.losses.chunk_plan import first_argmax


def shift_targets(tokens: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array):
    """Aligns targets with the model outputs that predict them.

    Args:
      tokens: int [B, L] token ids.
      loss_mask: int/bool [B, L]; 1 where the token is trained.
      segment_ids: int [B, L]; 0 = padding, 1.. = packed example.

    Returns:
      targets: int32 [B, L], `targets[:, t] = tokens[:, t + 1]`, last column 0.
      target_mask: int32 [B, L], 1 where `targets[:, t]` is trained: the next token is trained,
        belongs to the same segment as position t and is not padding. Last column 0. So the last
        token of one packed example never "predicts" the first token of the next.
    """
    next_segment = segment_ids[:, 1:]
    same_segment = (next_segment == segment_ids[:, :-1]) & (next_segment > 0)
    mask = (loss_mask[:, 1:] > 0) & same_segment
    # The final position has no next token; pad with 0 (a valid id, so gathers stay in range).
    targets = jnp.pad(tokens[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    target_mask = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, 1)))
    return targets, target_mask


def _softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    # Gemma-style soft capping, cap * tanh(logits / cap); None leaves logits as they are.
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _logps_and_correct(logits_f32: jax.Array, targets: jax.Array):
    """[..., V] f32 logits, [...] targets -> ([...] target log-prob, [...] argmax == target)."""
    # logsumexp + gather instead of a full log_softmax: one fewer [..., V] temporary.
    lse = jax.nn.logsumexp(logits_f32, axis=-1)
    picked = jnp.take_along_axis(logits_f32, targets[..., None], axis=-1)[..., 0]
    correct = first_argmax(logits_f32) == targets
    return picked - lse, correct


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of each target token.

    Args:
      logits: [B, L, V], any float dtype; cast to float32 before the softmax so bf16 models
        get fp32 log-probs.
      targets: int [B, L] (from `shift_targets`).

    Returns:
      float32 [B, L]: `log_softmax(logits)[b, t, targets[b, t]]`.
    """
    return full_token_logps(logits, targets)[0]


def full_token_logps(logits: jax.Array, targets: jax.Array, *, logit_softcap: float | None = None):
    """Unchunked target log-probs and argmax accuracy, from logits that already exist.

    Args:
      logits: [B, L, V] any float dtype (cast to float32).
      targets: int [B, L].
      logit_softcap: optional soft cap applied before the softmax (None when the model already
        applied it).

    Returns:
      logps: float32 [B, L] target log-probs.
      correct: bool [B, L], argmax of the logits == target (for `mean_token_accuracy`).
    """
    return _logps_and_correct(_softcap(logits.astype(jnp.float32), logit_softcap), targets)


def mean_token_accuracy(correct: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Share of target tokens whose argmax prediction is right (TRL's `mean_token_accuracy`).

    Args: correct bool [B, L]; target_mask [B, L]. Returns a float32 scalar (0 with no targets).
    """
    mask = target_mask > 0
    count = jnp.sum(mask, dtype=jnp.float32)
    hits = jnp.sum(correct & mask, dtype=jnp.float32)
    return hits / jnp.maximum(count, 1.0)


def sft_loss(token_logps: jax.Array, target_mask: jax.Array, *, normalizer=None):
    """Token-mean negative log-likelihood over target tokens.

    Args:
      token_logps: float [B, L] target log-probs.
      target_mask: [B, L], 1 on trained targets (from `shift_targets`).
      normalizer: optional scalar replacing the local target count as the denominator. Pass the
        target count of the whole (accumulated) batch so that the losses of its micro-batches
        sum to the full-batch loss.

    Returns:
      loss: float32 scalar, `-sum(mask * logps) / denominator`; 0 (not NaN) when the
        denominator is 0.
      metrics: {"loss": loss, "num_tokens": float32 local target count}.
    """
    mask = target_mask > 0
    # where, not multiply: a -inf log-prob at a masked position must not turn into NaN.
    nll = -jnp.sum(jnp.where(mask, token_logps.astype(jnp.float32), 0.0))
    num_tokens = jnp.sum(mask, dtype=jnp.float32)
    denom = num_tokens if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    has_tokens = denom > 0
    loss = jnp.where(has_tokens, nll / jnp.where(has_tokens, denom, 1.0), 0.0)
    return loss, {"loss": loss, "num_tokens": num_tokens}


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Per-row, per-segment sums: [B, L] values -> float32 [B, S]; column s is segment s + 1.

    Positions with segment 0 (padding) or a segment id above `num_segments` are dropped.
    """
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    one_hot_BxLxS = segment_ids[:, :, None] == ids[None, None, :]
    # where + sum rather than an einsum: exact f32 sums on every backend (TPU matmuls may
    # round f32 inputs to bf16 at default precision).
    return jnp.sum(jnp.where(one_hot_BxLxS, values.astype(jnp.float32)[:, :, None], 0.0), axis=1)


def sequence_logps(token_logps: jax.Array, target_mask: jax.Array, segment_ids: jax.Array,
                   num_segments: int) -> jax.Array:
    """Summed target log-prob of each packed example: [B, L] -> float32 [B, S].

    Column s holds segment s + 1 of the row. A target at position t belongs to the segment of
    the token it predicts, `segment_ids[:, t + 1]`; `shift_targets` only keeps targets where that
    equals `segment_ids[:, t]`, so this uses the unshifted `segment_ids[:, t]` (no shift needed).

    Args:
      token_logps: float [B, L]; target_mask: [B, L]; segment_ids: int [B, L];
      num_segments: S, the most segments a row can hold.
    """
    masked = jnp.where(target_mask > 0, token_logps.astype(jnp.float32), 0.0)
    return segment_sums(masked, segment_ids, num_segments)


def sequence_lengths(target_mask: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Number of target tokens of each packed example: [B, L] -> float32 [B, S] (as above)."""
    return segment_sums((target_mask > 0).astype(jnp.float32), segment_ids, num_segments)


def sequence_logit_means(mean_logits: jax.Array, target_mask: jax.Array, segment_ids: jax.Array,
                         num_segments: int) -> jax.Array:
    """Mean logit over the target tokens of each packed example, for TRL's `logits/chosen` and
    `logits/rejected`.

    Args:
      mean_logits: float [B, L], the logits averaged over the vocabulary (`logits.mean(-1)`).
      target_mask, segment_ids: [B, L]; num_segments: S.

    Returns:
      float32 [B, S]: per segment, the average of `mean_logits` over its target tokens (0 for an
      empty segment). TRL averages over all completion tokens of the batch, i.e. weights each
      sequence by its length: `sum(means * lengths) / sum(lengths)` with `sequence_lengths`.
    """
    masked = jnp.where(target_mask > 0, mean_logits.astype(jnp.float32), 0.0)
    sums = segment_sums(masked, segment_ids, num_segments)
    return sums / jnp.maximum(sequence_lengths(target_mask, segment_ids, num_segments), 1.0)
