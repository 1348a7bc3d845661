"""Losses as pure functions of arrays (no model, no config, no Flax).

`token.py`: next-token targets, log-probs (whole or chunked over the sequence), the SFT loss
and per-sequence reductions of packed rows. `preference.py`: every DPO loss type, one small
function each, behind `dpo_loss`.
"""

from jaxft.losses.preference import (
    DPO_LOSS_TYPES, F_DIVERGENCES, LOSS_FNS, PairTerms, dpo_loss, validate_dpo_settings,
)
from jaxft.losses.token import (
    chunked_token_logps, full_token_logps, mean_token_accuracy, segment_sums, sequence_lengths,
    sequence_logit_means, sequence_logps, sft_loss, shift_targets, token_logps,
)

__all__ = [
    "DPO_LOSS_TYPES", "F_DIVERGENCES", "LOSS_FNS", "PairTerms", "chunked_token_logps", "dpo_loss",
    "full_token_logps", "mean_token_accuracy", "segment_sums", "sequence_lengths",
    "sequence_logit_means", "sequence_logps", "sft_loss", "shift_targets", "token_logps",
    "validate_dpo_settings",
]
