"""The DPO step: policy vs frozen reference log-probs of chosen and rejected completions.

`dpo_step(state, reference, batch) -> (state, metrics)` where `reference` is one of:
  - the reference params (a plain argument: frozen, never donated, never in the optimizer),
  - a precomputed table [N, 2] of reference (chosen, rejected) log-probs keyed by pair index,
  - None (reference-free: the reference log-probs are 0).
Chosen and rejected sequences go through the model in one forward (they are rows, or
segments of packed rows, of the same batch); gradients reach the policy params only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft import losses
from jaxft.models.adapters import adapters_off
from jaxft.parallel.sharding import batch_sharding, replicated
from jaxft.steps.common import (
    ROW_KEYS, RouterTraining, accumulate_gradients, apply_update, dropout_key, micro_batch_row, router_loss_terms,
    split_micro_batches, token_logps_for, with_frozen,
)
from jaxft.steps.router_bias import balance_router_bias

PAIR_KEYS = ("chosen_row", "chosen_segment", "rejected_row", "rejected_segment", "pair_mask", "pair_index")


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per-pair sums over completion tokens, each [P]."""
    chosen: jax.Array
    rejected: jax.Array
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array
    chosen_logits: jax.Array  # mean logit over chosen completion tokens (TRL's logits/chosen)
    rejected_logits: jax.Array
    router: tuple | None = None  # the micro-batch's MoE routing (`with_router` only)


def pair_logps(graphdef, params, rows: dict, pairs: dict, *, num_segments: int, micro_index=0,
               accumulate: int = 1, rows_per_unit: int = 1, loss_chunk_size: int = 0, dropout_rng=None,
               with_router: bool = False) -> tuple[PairLogps, jax.Array]:
    """Log-probs of every pair whose rows are in this micro-batch, and that membership mask.

    rows: [R/A, L] arrays of micro-batch `micro_index` (see `split_micro_batches`).
    pairs: [P] arrays addressing rows of the whole batch.
    """
    logps, target_mask, _, mean_logits, router = token_logps_for(
        graphdef, params, rows, loss_chunk_size=loss_chunk_size, dropout_rng=dropout_rng, with_router=with_router)
    seg = rows["segment_ids"]
    seq = losses.sequence_logps(logps, target_mask, seg, num_segments)  # [R/A, S]
    lengths = losses.sequence_lengths(target_mask, seg, num_segments)
    logit_means = losses.sequence_logit_means(mean_logits, target_mask, seg, num_segments)

    c_micro, c_row = micro_batch_row(pairs["chosen_row"], accumulate, rows_per_unit)
    _, r_row = micro_batch_row(pairs["rejected_row"], accumulate, rows_per_unit)  # same micro-batch
    in_micro = (c_micro == micro_index) & (pairs["pair_mask"] > 0)
    c_seg, r_seg = pairs["chosen_segment"] - 1, pairs["rejected_segment"] - 1
    n_rows = seq.shape[0]
    c_row, r_row = jnp.clip(c_row, 0, n_rows - 1), jnp.clip(r_row, 0, n_rows - 1)
    c_seg, r_seg = jnp.clip(c_seg, 0, num_segments - 1), jnp.clip(r_seg, 0, num_segments - 1)
    out = PairLogps(
        chosen=seq[c_row, c_seg], rejected=seq[r_row, r_seg],
        chosen_lengths=lengths[c_row, c_seg], rejected_lengths=lengths[r_row, r_seg],
        chosen_logits=logit_means[c_row, c_seg], rejected_logits=logit_means[r_row, r_seg], router=router,
    )
    return out, in_micro


def reference_pair_logps(graphdef, reference, mode: str, rows, pairs, **kw):
    """Reference (chosen, rejected) log-probs [P] for `mode` in params / table / none."""
    if mode == "none":
        zeros = jnp.zeros(pairs["pair_mask"].shape, jnp.float32)
        return zeros, zeros
    if mode == "table":
        index = jnp.clip(pairs["pair_index"], 0, reference.shape[0] - 1)
        return reference[index, 0], reference[index, 1]
    ref, _ = pair_logps(graphdef, jax.lax.stop_gradient(reference), rows, pairs, **kw)
    return ref.chosen, ref.rejected


def make_dpo_step(graphdef, tx, schedule, *, loss_kwargs: dict, reference_mode: str,
                  num_segments: int, rows_per_pair: int, accumulate: int = 1, loss_chunk_size: int = 0,
                  dropout_seed: int | None = None, router: RouterTraining | None = None):
    """The pure DPO step `(state, reference, batch, frozen=None) -> (state, metrics)`.

    With LoRA, `frozen` is the base and the state's params the adapters; a "params"
    reference is then a base run with the adapters off: `reference` None means the frozen
    base itself (no second copy, no second argument). router: how the policy's routing trains
    (`RouterTraining`; a mixture of experts; None: dense)."""
    moe = router is not None

    def step(state, reference, batch, frozen=None):
        if reference_mode == "params" and frozen is not None:
            reference = with_frozen(adapters_off(state["params"]), frozen if reference is None else reference)
        pairs = {k: batch[k] for k in PAIR_KEYS}
        # rows_per_pair = 2 without packing (rows 2i, 2i+1), 1 when a pair shares a row.
        micro_rows = split_micro_batches({k: batch[k] for k in ROW_KEYS}, accumulate, rows_per_pair)
        total_pairs = jnp.maximum(pairs["pair_mask"].astype(jnp.float32).sum(), 1.0)
        micro_ids = jnp.arange(accumulate)
        kw = dict(num_segments=num_segments, accumulate=accumulate, rows_per_unit=rows_per_pair,
                  loss_chunk_size=loss_chunk_size)

        def loss_fn(params, micro):
            rows, k = micro
            # LoRA dropout in the policy's forward only: the reference runs without it.
            pol, in_micro = pair_logps(graphdef, with_frozen(params, frozen), rows, pairs, micro_index=k,
                                       dropout_rng=dropout_key(dropout_seed, state["step"], k), with_router=moe, **kw)
            ref_c, ref_r = reference_pair_logps(graphdef, reference, reference_mode, rows, pairs,
                                                micro_index=k, **kw)
            mask = in_micro.astype(jnp.float32)
            loss, metrics = losses.dpo_loss(
                pol.chosen, pol.rejected, ref_c, ref_r, pair_mask=mask,
                chosen_lengths=pol.chosen_lengths, rejected_lengths=pol.rejected_lengths, **loss_kwargs,
            )
            metrics = dict(metrics)
            n = mask.sum()
            metrics["logits/chosen"] = (pol.chosen_logits * mask).sum() / jnp.maximum(n, 1.0)
            metrics["logits/rejected"] = (pol.rejected_logits * mask).sum() / jnp.maximum(n, 1.0)
            # dpo_loss averages over this micro-batch's pairs; weight by its share of the batch
            # so summing micro-batches gives the full batch's mean.
            share = n / total_pairs
            loss = loss * share
            metrics = {k: v * share for k, v in metrics.items() if k != "loss"}
            if moe:  # the policy's routing in this micro-batch, averaged over micro-batches
                aux, router_metrics = router_loss_terms(pol.router, rows["segment_ids"], router)
                metrics.update({name: value / accumulate for name, value in router_metrics.items()
                                if name != "router_picks"}, router_picks=router_metrics["router_picks"])
                loss = loss + aux / accumulate
            return loss, metrics

        loss, metrics, grads = accumulate_gradients(loss_fn, state["params"], (micro_rows, micro_ids),
                                                    accumulate=accumulate)
        new_state, update_metrics = apply_update(state, grads, loss, tx)
        picks = metrics.pop("router_picks", None)
        if moe and router.bias_update_rate:
            new_state = balance_router_bias(graphdef, new_state, picks, router.bias_update_rate,
                                            update_metrics["skipped"])
        return new_state, {"loss": loss, "learning_rate": schedule(state["step"]), **metrics, **update_metrics}

    return step


def batch_shardings(mesh) -> dict:
    """Rows split over (data, fsdp, expert); the per-pair arrays replicated."""
    rows, everywhere = batch_sharding(mesh), replicated(mesh)
    return {**{k: rows for k in ROW_KEYS}, **{k: everywhere for k in PAIR_KEYS}}


def make_pair_logps_fn(graphdef, *, num_segments: int, loss_chunk_size: int = 0):
    """(params, batch) -> {chosen, rejected, chosen_lengths, rejected_lengths}, each [P]: for
    precomputing a reference and for held-out preference metrics."""

    def fn(params, batch):
        rows = {k: batch[k] for k in ROW_KEYS}
        pairs = {k: batch[k] for k in PAIR_KEYS}
        out, _ = pair_logps(graphdef, params, rows, pairs, num_segments=num_segments,
                            loss_chunk_size=loss_chunk_size)
        return {"chosen": out.chosen, "rejected": out.rejected,
                "chosen_lengths": out.chosen_lengths, "rejected_lengths": out.rejected_lengths}

    return fn


__all__ = [
    "PairLogps", "batch_shardings", "make_dpo_step",
    "make_pair_logps_fn", "pair_logps", "reference_pair_logps",
]
