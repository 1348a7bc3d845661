"""Losses as pure functions of arrays (no model, no config, no Flax).

`token.py`: next-token targets, log-probs from logits, the SFT loss and per-sequence reductions
of packed rows. `chunked.py`: target log-probs from hidden states, chunked over the trained
tokens (never the whole logits). `preference.py`: every DPO loss type, one small function each,
behind `dpo_loss`. `router.py`: the mixture-of-experts load-balancing loss, router z-loss and expert-load metrics.
"""

from jaxft.losses.chunked import auto_chunk_size, chunked_token_logps, resolve_chunk_size
from jaxft.losses.preference import (
    DPO_LOSS_TYPES, F_DIVERGENCES, LOSS_FNS, PairTerms, dpo_loss, validate_dpo_settings,
)
from jaxft.losses.router import bias_balancing_update, expert_load_metrics, load_balancing_loss, router_z_loss
from jaxft.losses.token import (
    full_token_logps, mean_token_accuracy, segment_sums, sequence_lengths,
    sequence_logit_means, sequence_logps, sft_loss, shift_targets, token_logps,
)

__all__ = [
    "DPO_LOSS_TYPES", "F_DIVERGENCES", "LOSS_FNS", "PairTerms", "auto_chunk_size", "bias_balancing_update", "chunked_token_logps",
    "dpo_loss", "expert_load_metrics", "full_token_logps", "load_balancing_loss", "mean_token_accuracy", "resolve_chunk_size", "router_z_loss", "segment_sums",
    "sequence_lengths", "sequence_logit_means", "sequence_logps", "sft_loss", "shift_targets", "token_logps",
    "validate_dpo_settings",
]
