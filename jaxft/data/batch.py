"""The typed records that flow from the data layer into the train steps.

Two levels:
- *examples* are one tokenized record each (variable length, numpy int32), produced by
    `jaxft.data.tokenize` and consumed by packing / batching;
- *batches* are fixed-shape numpy arrays for one host's part of a global step, produced by
    `jaxft.data.pipeline` and turned into global jax arrays by `jaxft.parallel.batches.to_global`.

Token convention (docs/data.md, "Data formats"): `loss_mask[t] == 1` means token `t` is a *target*
that is trained (it is predicted from the tokens before it). The first token of an example
is never a target. Padding is on the right; padding tokens have segment id 0, loss mask 0,
position 0 and token id `pad_id`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenized SFT / language-modelling record.

    input_ids: [T] int32, the full sequence (BOS if the tokenizer adds one ... closing EOS).
    loss_mask: [T] int32, 1 on trained tokens (completion / assistant tokens and the EOS).
    index: position of the record in its source (for error messages and reference caching).
    """
    input_ids: np.ndarray
    loss_mask: np.ndarray
    index: int = -1

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> np.ndarray:
        """The tokens before the first trained one: the prompt (its first token when every
        token but the first is trained: text records, completion_only_loss=False)."""
        return _before_first_target(self.input_ids, self.loss_mask)


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One tokenized preference pair: the full chosen and rejected sequences.

    chosen_ids / rejected_ids: [Tc] / [Tr] int32, prompt + completion (+ EOS), each a full
    sequence as the model sees it; the shared prompt is repeated in both.
    chosen_mask / rejected_mask: 1 on the completion tokens whose log-probs DPO sums.
    index: position of the pair in its source; keys precomputed reference log-probs.
    """
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    index: int = -1

    def __len__(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def prompt_ids(self) -> np.ndarray:
        """The shared prompt: the chosen sequence's tokens before its completion."""
        return _before_first_target(self.chosen_ids, self.chosen_mask)


def _before_first_target(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    trained = np.flatnonzero(mask)
    return ids[:trained[0] if len(trained) else len(ids)]


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """One host's rows of a global SFT batch. All int32, shape [B, L], right-padded.

    tokens:      token ids; `pad_id` where segment_ids == 0.
    positions:   0, 1, 2 ... restarting at every packed example; 0 on padding.
    segment_ids: 1, 2, ... per packed example in a row; 0 = padding.
    loss_mask:   1 on trained target tokens (see module docstring).
    example_index: [B, S] int32, source index of segment s+1 of each row, -1 where none.
    """
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    example_index: np.ndarray


@dataclasses.dataclass(frozen=True)
class DPOBatch:
    """One host's rows, and the pairs of the whole global batch.

    Rows ([R, L] int32, right-padded) hold chosen and rejected sequences as segments; a pair's
    chosen and rejected are always in the same row when packed. Without packing R = 2P, row 2i
    is pair i's chosen and row 2i+1 its rejected (each as segment 1).

    tokens, positions, segment_ids, loss_mask: as in SFTBatch, [R, L] (this host's rows).
    The pair arrays below cover every host's pairs ([P] is the global pair count) and are the
    same on every host; their row numbers are global (host h holds rows [h * R, (h + 1) * R)).
    chosen_row, chosen_segment:     [P] int32, where pair p's chosen sequence lives
                                                                (segment ids start at 1).
    rejected_row, rejected_segment: [P] int32, likewise for the rejected sequence.
    pair_mask:  [P] int32, 1 for a real pair, 0 for an unused pair slot (packing leaves some).
    pair_index: [P] int32, source index of the pair (keys precomputed reference log-probs), -1
                        for unused slots.
    """
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    chosen_row: np.ndarray
    chosen_segment: np.ndarray
    rejected_row: np.ndarray
    rejected_segment: np.ndarray
    pair_mask: np.ndarray
    pair_index: np.ndarray
