"""Records -> examples for a whole source: `load_examples` (through the tokenised cache) and
`tokenize_source`, with the DataReport of what was kept, dropped and skipped.

How one record becomes token ids and a loss mask (token convention, chat templates,
truncation) is `jaxft.data.encode`'s docstring; its names are importable from here too.

Records over `max_record_bytes` (data.max_record_bytes) are dropped before they are parsed or
tokenized, counted apart (`DataReport.num_too_large`, with the first one's location) and
logged; like records too long for max_length they are not invalid. A fast tokenizer holds
100-250 bytes per character of a string it encodes (its Encoding: ids, offsets, token strings),
so a 50 MB record would need ~12 GB, and a DPO pair encodes its prompt once per side.
"""

from __future__ import annotations

import itertools
import logging

from jaxft.data.batch import PreferenceExample
from jaxft.data.data_error import DataError
from jaxft.data.encode import Encoder, NoChatTemplateError, process_record
from jaxft.data.encode import ToolTemplateError, encode_record  # noqa: F401 (public here too, as before)
from jaxft.data.formats import formats_for_kind
from jaxft.data.report import DataReport, ExampleSet  # noqa: F401 - re-exported
from jaxft.data.workers import ordered_map
from jaxft.data.sources import DEFAULT_MAX_RECORD_BYTES, RecordTooLargeError, read_records
from jaxft.errors import ConfigError

log = logging.getLogger("jaxft.data")

TRUNCATION_MODES = ("truncate_completion", "drop")
MAX_ERRORS = 20  # errors kept in a DataReport
MAX_LOGGED_SKIPS = 10  # one warning each; then a summary


def load_examples(source: str, tokenizer, *, kind: str, max_length: int, fmt: str = "auto",
                  truncation: str = "truncate_completion", skip_invalid: bool = False,
                  completion_only_loss: bool = True, split: str = "train",
                  limit: int | None = None, chat_template: str | None = None,
                  num_proc: int = 1, cache_dir: str | None = None,
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ExampleSet:
    """Read, validate and tokenize every record of `source` for `kind` ("sft" or "dpo").

    Args:
      source: file / glob / folder / saved dataset / hub name (see `sources.read_records`).
      tokenizer: a `transformers` tokenizer (with a chat template for conversational data).
      kind: "sft" (SFTExample) or "dpo" (PreferenceExample); decides the accepted formats.
      max_length: tokens per sequence; see `jaxft.data.encode` for truncation.
      fmt: "auto" or a format name from `formats.ALL_FORMATS`.
      truncation: "truncate_completion" or "drop".
      skip_invalid: count, log and skip bad records instead of raising on the first.
      completion_only_loss: SFT loss on completions / assistant turns only (else all tokens).
      split: the split of a saved DatasetDict or hub dataset.
      limit: read at most this many records.
      chat_template: Jinja chat template to use instead of the tokenizer's.
      num_proc: tokenizer processes (`jaxft.data.workers`); 1 = this process.
      max_record_bytes: records over this many bytes are dropped unread and counted (the
        module docstring); 0 = no limit.
      cache_dir: a folder of tokenised caches (`jaxft.data.cache`): the examples are read from
        the cache whose fingerprint (source files, tokenizer, template, every setting above)
        matches, else tokenised and cached there. None: no cache.

    Returns:
      ExampleSet: examples in source order (`example.index` = record index) and a DataReport.

    Raises:
      DataError: a bad record (unless skip_invalid), a bad source, no chat template for a
        conversational record, or no usable example at all.
    """
    settings = dict(kind=kind, max_length=max_length, fmt=fmt, truncation=truncation,
                    completion_only_loss=completion_only_loss, split=split, limit=limit,
                    chat_template=chat_template, max_record_bytes=max_record_bytes)
    if cache_dir:
        result = tokenize_cached(cache_dir, source, tokenizer, num_proc=num_proc, **settings)
        if result.report.num_skipped and not skip_invalid:
            location, message = result.report.errors[0]
            raise DataError(location, message)
    else:
        result = tokenize_source(source, tokenizer, num_proc=num_proc, skip_invalid=skip_invalid, **settings)
    report = result.report
    if not result.examples:
        why = (f"{report.num_records} records: {report.num_skipped} invalid, "
               f"{report.num_dropped_too_long} longer than max_length {max_length}"
               + (f", {report.num_no_trained_tokens} with no trained token" if report.num_no_trained_tokens else "")
               + (f", {report.num_too_large} over data.max_record_bytes" if report.num_too_large else ""))
        if report.errors:
            why += f"; first error: {report.errors[0][0]}: {report.errors[0][1]}"
        raise DataError(str(source), f"no usable examples ({why})")
    return result


def tokenize_cached(cache_dir: str, source: str, tokenizer, *, num_proc: int = 1, **settings) -> ExampleSet:
    """`tokenize_source` through the tokenised cache under `cache_dir` (`jaxft.data.cache`),
    keyed by `settings` (every `tokenize_source` argument but skip_invalid and num_proc).
    Cached with invalid records skipped and reported, so a strict run and check-data share
    one cache; `load_examples` then fails a strict run on the first of them."""
    from jaxft.data.cache import cached

    return cached(cache_dir, source, tokenizer, settings,
                  lambda: tokenize_source(source, tokenizer, num_proc=num_proc, skip_invalid=True, **settings))


def tokenize_source(source: str, tokenizer, *, kind: str, max_length: int, fmt: str = "auto",
                    truncation: str = "truncate_completion", skip_invalid: bool = False,
                    completion_only_loss: bool = True, split: str = "train",
                    limit: int | None = None, chat_template: str | None = None,
                    num_proc: int = 1, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> ExampleSet:
    """`load_examples` without the cache and the final "no usable examples" check (for check-data)."""
    _check_settings(kind, fmt, truncation, max_length)
    options = dict(kind=kind, fmt=fmt, max_length=max_length, truncation=truncation,
                   completion_only_loss=completion_only_loss)
    report = DataReport(source=str(source))
    examples = []
    records = itertools.islice(read_records(source, split=split, max_record_bytes=max_record_bytes), limit)
    numbered = ((index, location, raw) for index, (location, raw) in enumerate(records))
    outcomes = ordered_map(_encoder_for, (tokenizer, chat_template, options), _outcome, numbered, num_proc=num_proc)
    with progress(source) as bar:
        for outcome in outcomes:
            report.num_records += 1
            bar.update(1)
            if isinstance(outcome, RecordTooLargeError):
                _drop_too_large(report, outcome)
                continue
            if isinstance(outcome, DataError):
                if not skip_invalid or isinstance(outcome, NoChatTemplateError):
                    raise outcome
                _skip(report, outcome)
                continue
            example = _count(report, *outcome)
            if example is not None:
                examples.append(example)
    report.num_examples = len(examples)
    report.seconds = bar.seconds
    _log_summary(report, source, max_length=max_length, max_record_bytes=max_record_bytes, num_proc=num_proc)
    return ExampleSet(examples, report)


def _check_settings(kind: str, fmt: str, truncation: str, max_length: int) -> None:
    accepted = formats_for_kind(kind)
    if fmt != "auto" and fmt not in accepted:  # a config mistake: say so before reading
        raise ConfigError(f"data format {fmt!r} cannot be used for {kind}; {kind} accepts "
                         f"'auto' or {', '.join(accepted)}")
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")


def _count(report: DataReport, fmt_found: str, example, status: str, raw_len: int):
    """Adds one tokenised record (`process_record`'s result) to `report`; returns the example to
    keep, or None when it was dropped."""
    report.raw_lengths.append(raw_len)
    if not report.count_outcome(fmt_found, example, status):
        return None
    is_pair = isinstance(example, PreferenceExample)
    report.lengths.append(max(len(example.chosen_ids), len(example.rejected_ids)) if is_pair
                          else len(example))
    report.num_tokens += len(example)
    report.num_trained_tokens += int(example.chosen_mask.sum() + example.rejected_mask.sum() if is_pair
                                     else example.loss_mask.sum())
    return example


def _log_summary(report: DataReport, source: str, *, max_length: int, max_record_bytes: int,
                 num_proc: int) -> None:
    if report.num_skipped > MAX_LOGGED_SKIPS:
        log.warning("%s: skipped %d invalid records of %d (the first %d are logged above)",
                    source, report.num_skipped, report.num_records, MAX_LOGGED_SKIPS)
    if report.num_too_large:
        log.warning("%s: dropped %d records over data.max_record_bytes %d, unread (the first: %s); "
                    "raise data.max_record_bytes (0 = no limit) to train on them", source,
                    report.num_too_large, max_record_bytes, report.first_too_large)
    if report.num_dropped_too_long:
        log.info("%s: dropped %d records longer than max_length %d (%d whose prompt alone fills it)",
                 source, report.num_dropped_too_long, max_length, report.num_prompt_too_long)
    log.info("%s (max_length %d): %s; tokenised in %.1f s (%.0f records/s%s)", source, max_length,
             report.summary(), report.seconds, report.num_records / max(report.seconds, 1e-9),
             f", {num_proc} processes" if num_proc > 1 else "")


def _encoder_for(tokenizer, chat_template, options) -> tuple:
    return Encoder(tokenizer, chat_template), options


def _outcome(state, item):
    """`process_record`'s result for one (index, location, raw) item, or the DataError a bad
    record raised (the caller decides whether to skip it). Runs in tokeniser workers too."""
    encoder, options = state
    index, location, raw = item
    try:
        return process_record(encoder, raw, index, location, **options)
    except DataError as err:
        return err


class progress:
    """A context manager counting records: a tqdm bar with rate and elapsed time on a
    terminal (process 0), its elapsed seconds as `.seconds` afterwards."""

    def __init__(self, source: str):
        self.source = source

    def __enter__(self):
        import sys
        import time

        from tqdm.auto import tqdm

        self.start = time.perf_counter()
        self.bar = tqdm(desc=f"tokenising {self.source}", unit=" records", leave=False,
                        disable=not sys.stderr.isatty(), mininterval=1.0)
        return self

    def update(self, n: int) -> None:
        self.bar.update(n)

    def __exit__(self, *exc):
        import time

        self.bar.close()
        self.seconds = time.perf_counter() - self.start
        return False


def _drop_too_large(report: DataReport, err: RecordTooLargeError) -> None:
    report.num_too_large += 1
    report.first_too_large = report.first_too_large or err.location


def _skip(report: DataReport, err: DataError) -> None:
    report.num_skipped += 1
    if len(report.errors) < MAX_ERRORS:
        report.errors.append((err.location, err.message))
    if report.num_skipped <= MAX_LOGGED_SKIPS:
        log.warning("skipping invalid record: %s", err)
