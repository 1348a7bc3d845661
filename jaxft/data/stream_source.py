"""One source read as a stream: tokenised examples in seeded-window order, epoch after epoch,
with a small resumable position. Nothing but the current window is ever held in memory.

The records of an epoch are read in source order (`sources.read_records`: files of a glob in
sorted order, lines of a JSONL file in order) and tokenised one by one (`tokenize.process_record`,
the in-memory loader's own function, so an example is token for token the one `load_examples`
makes). Every `window` consecutive *examples* form a window, shuffled by a permutation that is a
pure function of (seed, source, epoch, window number), and handed out in that order. When the
source ends, the last (shorter) window closes the epoch and the next epoch reads it again from
the first record, with new permutations: a stream is repeated as long as training asks.

Position (`get_state`): {"epoch", "window" (its number in the epoch), "records" (records of
the epoch before the window's first), "taken" (examples of the window handed out)}. Restoring
re-reads the records from the start of the epoch, skipping the first `records` without
tokenising them (parsing only), then tokenises the window again: the same examples, in the
same order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

from jaxft.data.data_error import DataError
from jaxft.data.encode import Encoder, NoChatTemplateError, process_record
from jaxft.data.mixture import seeded_rng
from jaxft.data.report import DataReport
from jaxft.data.sources import DEFAULT_MAX_RECORD_BYTES, RecordTooLargeError, looks_local, read_records
from jaxft.data.tokenize import MAX_ERRORS, MAX_LOGGED_SKIPS
from jaxft.errors import ConfigError

log = logging.getLogger("jaxft.data")

_TAG_WINDOW = 0x77696E64


class ExampleStream:
    """The examples of one source for `kind`, window-shuffled, repeated; resumable.

    Args:
      source: a file / glob / folder / saved dataset (`sources.read_records`), or a hub name
        (read through `datasets.load_dataset(..., streaming=True)`).
      tokenizer, kind, max_length, fmt, truncation, completion_only_loss, chat_template,
        skip_invalid, split: as `tokenize.load_examples`.
      window: examples per shuffle window (data.shuffle_buffer); memory is bounded by it.
      seed, source_id: decide the permutations (source_id keeps a mixture's sources apart).
    """

    def __init__(self, source: str, tokenizer, *, kind: str, max_length: int, window: int,
                 seed: int, source_id: int = 0, fmt: str = "auto",
                 truncation: str = "truncate_completion", skip_invalid: bool = False,
                 completion_only_loss: bool = True, chat_template: str | None = None,
                 split: str = "train", max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        if window < 1:
            raise ConfigError(f"config key data.shuffle_buffer: must be >= 1, got {window}")
        self.source, self.split, self.window_size = str(source), split, int(window)
        self._max_record_bytes = int(max_record_bytes)
        self._seed, self._id, self._skip_invalid = int(seed), int(source_id), skip_invalid
        self._encoder = Encoder(tokenizer, chat_template)
        self._options = dict(kind=kind, fmt=fmt, max_length=max_length, truncation=truncation,
                             completion_only_loss=completion_only_loss)
        # What this process has read so far (informational: a resume starts counting again).
        self.report = DataReport(source=self.source)
        self._reader: Iterator | None = None
        self._reader_at, self._pending = -1, None  # records of the epoch read; one read ahead
        self._set(epoch=0, window=0, records=0, taken=0)

    def _set(self, *, epoch: int, window: int, records: int, taken: int) -> None:
        self.epoch, self._window_index, self._records, self._taken = epoch, window, records, taken
        self._window: list | None = None  # read on demand
        self._records_after, self._last = records, False

    # -- reading -----------------------------------------------------------------------------

    def _open(self, skip: int) -> None:
        """A reader of this epoch's (index, (location, raw record)) from record `skip` on."""
        records = enumerate(_records(self.source, self.split, self._max_record_bytes))
        self._reader = itertools.islice(records, skip, None)
        self._reader_at, self._pending = skip, None

    def _read_one(self):
        """The reader's next record (None at the end); `_reader_at` counts those returned."""
        item, self._pending = self._pending or next(self._reader, None), None
        self._reader_at += item is not None
        return item

    def _fill(self) -> None:
        """Reads and tokenises the current window (up to `window_size` examples), shuffled.
        One raw record is read ahead (not tokenised), so that the last window of the source
        knows it is the last and the epoch ends with it."""
        if self._reader is None or self._reader_at != self._records:
            self._open(self._records)
        examples: list = []
        while len(examples) < self.window_size:
            item = self._read_one()
            if item is None:
                break
            index, (location, raw) = item
            example = self._example(index, location, raw)
            if example is not None:
                examples.append(example)
        self._records_after = self._reader_at
        self._pending = next(self._reader, None)
        self._last = self._pending is None
        order = seeded_rng(self._seed, _TAG_WINDOW, self._id, self.epoch,
                           self._window_index).permutation(len(examples))
        self._window = [examples[i] for i in order]
        if self._window_index == 0 and not examples:  # a window stops short only at the end
            raise self._unusable()

    def _unusable(self) -> DataError:
        errors = self.report.errors
        return DataError(self.source, "no usable examples (" + self.report.summary() + (
            f"; first error: {errors[0][0]}: {errors[0][1]}" if errors else "") + ")")

    def check_start(self) -> None:
        """Reads up to the source's first usable example, leaving the position as it is: a
        bad first record, a wrong format or an unusable source fail at start-up, not mid-run."""
        for index, (location, raw) in enumerate(_records(self.source, self.split, self._max_record_bytes)):
            if self._example(index, location, raw) is not None:
                self.report = DataReport(source=self.source)
                return
        raise self._unusable()

    def _example(self, index: int, location: str, raw):
        """The record's example, or None (dropped, or invalid and skipped); raises DataError
        for an invalid record unless skip_invalid."""
        report = self.report
        report.num_records += 1
        if isinstance(raw, RecordTooLargeError):  # dropped unread and counted, as in memory
            report.num_too_large += 1
            report.first_too_large = report.first_too_large or raw.location
            return None
        try:
            fmt, example, status, raw_len = process_record(
                self._encoder, raw, index, location, **self._options)
        except DataError as err:
            if not self._skip_invalid or isinstance(err, NoChatTemplateError):
                raise
            report.num_skipped += 1
            if len(report.errors) < MAX_ERRORS:
                report.errors.append((err.location, err.message))
            if report.num_skipped <= MAX_LOGGED_SKIPS:
                log.warning("skipping invalid record: %s", err)
            return None
        if not report.count_outcome(fmt, example, status):
            return None
        report.num_examples += 1
        report.num_tokens += len(example)
        return example

    # -- handing out -------------------------------------------------------------------------

    def take(self, count: int, *, stop_at_epoch_end: bool = False) -> tuple[list, bool]:
        """The next `count` examples. With `stop_at_epoch_end`, fewer when the epoch ends
        first; returns (examples, whether the epoch ended with them)."""
        out: list = []
        while len(out) < count:
            if self._window is None:
                self._fill()
            n = min(count - len(out), len(self._window) - self._taken)
            out += self._window[self._taken:self._taken + n]
            self._taken += n
            if self._taken == len(self._window) and self._advance() and stop_at_epoch_end:
                return out, True
        return out, False

    def _advance(self) -> bool:
        """Moves past a used-up window; True when it closed the epoch."""
        if self._last:
            self._set(epoch=self.epoch + 1, window=0, records=0, taken=0)
            return True
        self._set(epoch=self.epoch, window=self._window_index + 1, records=self._records_after,
                  taken=0)
        return False

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "window": self._window_index, "records": self._records,
                "taken": self._taken}

    def set_state(self, state: dict) -> None:
        self._set(epoch=int(state["epoch"]), window=int(state["window"]),
                  records=int(state["records"]), taken=int(state["taken"]))


def _records(source: str, split: str, max_record_bytes: int = 0) -> Iterator[tuple[str, object]]:
    """`read_records(source)`, except that a hub name is streamed (never downloaded whole)."""
    return (read_records(source, split=split, max_record_bytes=max_record_bytes) if _is_local(source)
            else _hub_stream(source, split))


def _is_local(source: str) -> bool:
    """A file, folder or glob (as `read_records` tells them from hub names)."""
    return looks_local(source)


def _hub_stream(name: str, split: str) -> Iterator[tuple[str, object]]:
    """A hub dataset in streaming mode (untested offline: it needs the hub)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # offline, unknown repo, gated, bad split: all the same to us
        raise DataError(name, "not a local file or folder, and not a hub dataset that could be "
                              f"streamed ({type(err).__name__}: {err})") from None
    for i, record in enumerate(ds):
        yield f"{name}[{split}] index {i}", record
