"""What both training iterators (`pipeline.BatchIterator`, `stream.StreamBatchIterator`) count as
they hand out batches, and the progress read from it: real tokens, padding, segments, epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from jaxft.data.batch import DPOBatch, SFTBatch
from jaxft.data.packing import BatchLayout


class BatchProgress(ABC):
    """The iteration and token counts of a training iterator. A subclass calls `_start_progress`
    in its `__init__` and defines `_next_units()` (the next global batch's units, as
    `BatchLayout.build` takes them) and `dataset_epochs` (completed passes per source)."""

    def _start_progress(self, layout: BatchLayout, max_segments_per_row: int) -> None:
        self._layout = layout
        self._max_segments = max_segments_per_row
        # Global batches, their non-padding tokens and all their row tokens, all hosts' rows.
        self._batches, self._real, self._slots = 0, 0, 0
        self.last_padding_fraction = 0.0

    def _progress_state(self) -> dict[str, int]:
        """The counts as `get_state` saves them."""
        return {"batches": self._batches, "real_tokens": self._real, "slot_tokens": self._slots}

    def _set_progress_state(self, state: dict) -> None:
        self._batches = int(state["batches"])
        self._real, self._slots = int(state["real_tokens"]), int(state["slot_tokens"])

    def __iter__(self) -> Iterator[SFTBatch | DPOBatch]:
        return self

    def __next__(self) -> SFTBatch | DPOBatch:
        batch, real, slots = self._layout.build(self._next_units())
        self._batches += 1
        self._real += real
        self._slots += slots
        self.last_padding_fraction = 1.0 - real / slots
        return batch

    @abstractmethod
    def _next_units(self) -> list:
        """The next global batch's units, as `BatchLayout.build` takes them."""

    @property
    @abstractmethod
    def dataset_epochs(self) -> dict[str, int]:
        """Completed passes over each source."""

    @property
    def epoch(self) -> int:
        """The epoch of the data (one source); for a mixture, of its most-repeated source."""
        return max(self.dataset_epochs.values())

    @property
    def real_tokens(self) -> int:
        """Non-padding tokens of every global batch produced so far (all hosts)."""
        return self._real

    @property
    def padding_fraction(self) -> float:
        """Share of padding in all row tokens produced so far (global batch, empty rows too)."""
        return 1.0 - self._real / self._slots if self._slots else 0.0

    @property
    def max_segments_per_row(self) -> int:
        """S, the segment axis of the batches: the configured cap when packing, else 1."""
        return self._max_segments if self._layout.packing else 1
