"""`jaxft check-data`: validate and measure a dataset before spending compute on it.

`check_data` reads and tokenizes a source exactly as training would (`tokenize.load_examples`
settings) but keeps going past bad records, then summarises: records per format, token
lengths, truncation and drops, the padding a run would carry with and without packing, and
the first errors with their coordinates. `format_check_result` renders that for the CLI,
which exits non-zero when `result.ok` is False.

`check_spec` takes what `data.train` takes (one source, a glob, a folder, or a weighted mixture
"a.jsonl=2,b.jsonl=1"), checks each source with one kind for all (training has one), and
`format_mixture` adds what the mixture draws from each.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxft.data.batch import PreferenceExample
from jaxft.data.data_error import DataError
from jaxft.data.encode import fit
from jaxft.data.formats import DPO_FORMATS, detect_format
from jaxft.data.mixture import parse_mixture
from jaxft.data.sources import DEFAULT_MAX_RECORD_BYTES, read_records
from jaxft.data.tokenize import MAX_ERRORS, DataReport, tokenize_cached, tokenize_source

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class CheckResult:
    """The outcome of `check_data`.

    report: the DataReport of loading (counts, errors, lengths).
    length_stats: {"p50", "p90", "p99", "max"} tokens per example before truncation (a pair:
        its longer sequence); empty when nothing was tokenized.
    padding: share of row tokens that would be padding (`packing.padding_fractions`):
        "padded" (each row padded to max_length), "bucketed" (length-grouped batches padded
        to a bucket: training without packing), "packed" (training with packing).
    packed_dpo_dropped: DPO only: pairs that packing (each sequence cut to max_length // 2,
        as the pipeline does) would drop on top of the report's drops.
    fatal: an error that stopped the check (missing source, no chat template, ...), or None.
    """
    source: str
    kind: str
    max_length: int
    report: DataReport
    length_stats: dict[str, int] = dataclasses.field(default_factory=dict)
    padding: dict[str, float] = dataclasses.field(default_factory=dict)
    packed_dpo_dropped: int = 0
    fatal: str | None = None
    packing: bool = False  # DPO pairs were loaded as packed training loads them

    @property
    def ok(self) -> bool:
        """True when the data trains as is: readable, no invalid record, some examples."""
        return (self.fatal is None and self.report.num_skipped == 0
                and self.report.num_examples > 0)


def check_data(source: str, tokenizer, *, kind: str, max_length: int, fmt: str = "auto",
               truncation: str = "truncate_completion", skip_invalid: bool = True,
               completion_only_loss: bool = True, split: str = "train", limit: int | None = None,
               chat_template: str | None = None, batch_size: int = 32,
               packing: bool = False, cache_dir: str | None = None, num_proc: int = 1,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> CheckResult:
    """Load `source` as `jaxft sft` / `jaxft dpo` would and measure it (see CheckResult).

    Arguments are those of `tokenize.load_examples`, plus `kind="auto"`: "dpo" if the first
    recognisable record is a preference record, else "sft". `skip_invalid=False` stops at the
    first bad record (reported as `fatal`). `batch_size` is the batch the bucketed padding
    assumes. `packing=True` loads DPO pairs as packed training does (each sequence cut to
    max_length // 2 so that a pair fits one row). Never raises DataError: problems end up in
    the result, `ok` False.
    """
    from jaxft.data import packing as layout

    try:
        if kind == "auto":
            kind = guess_kind(source, split=split, fmt=fmt, max_record_bytes=max_record_bytes)
        packed_pairs = kind == "dpo" and packing
        settings = dict(kind=kind, fmt=fmt, max_length=max_length // 2 if packed_pairs else max_length,
                        truncation=truncation, completion_only_loss=completion_only_loss, split=split,
                        limit=limit, chat_template=chat_template, max_record_bytes=max_record_bytes)
        if cache_dir:  # the run's tokenised cache: read it, or build it for the run
            loaded = tokenize_cached(cache_dir, source, tokenizer, num_proc=num_proc, **settings)
            if loaded.report.num_skipped and not skip_invalid:
                raise DataError(*loaded.report.errors[0])
        else:
            loaded = tokenize_source(source, tokenizer, skip_invalid=skip_invalid, num_proc=num_proc, **settings)
    except DataError as err:
        report = DataReport(source=str(source), errors=[(err.location, err.message)])
        return CheckResult(str(source), kind, max_length, report, fatal=str(err))
    report, examples = loaded.report, loaded.examples
    result = CheckResult(str(source), kind, max_length, report, packing=packed_pairs)
    if report.raw_lengths:
        lengths = np.asarray(report.raw_lengths)
        result.length_stats = {f"p{q}": int(np.percentile(lengths, q, method="lower"))
                               for q in PERCENTILES}
        result.length_stats["max"] = int(lengths.max())
    if examples:
        result.padding = layout.padding_fractions(examples, max_length, batch_size=batch_size)
        if kind == "dpo" and not packed_pairs:
            # A packed pair shares one row, so the pipeline cuts each side to max_length // 2.
            halved = _refit_pairs(examples, max_length // 2, truncation)
            result.packed_dpo_dropped = len(examples) - len(halved)
            packed = (layout.padding_fractions(halved, max_length, batch_size=batch_size)
                      if halved else {"packed": 1.0})
            result.padding["packed"] = packed["packed"]
    return result


@dataclasses.dataclass
class MixtureCheck:
    """`check_spec`'s outcome: the spec, its sources' weights (summing to 1) and results."""
    spec: str
    field: str
    kind: str
    weights: list[float]
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        """True when every source trains as is (training refuses a source with no example)."""
        return all(r.ok for r in self.results)


def check_spec(spec: str, tokenizer, *, kind: str, field: str = "data.train", **options) -> MixtureCheck:
    """`check_data` on every source of `spec`, a `data.train` value (or, with field="data.eval",
    a comma list whose weights may be left out), all with one kind: `kind`, or for "auto" the
    kind of the first source whose records tell. `options`: those of `check_data`.

    Raises:
      ValueError: `spec` is not valid mixture syntax (naming `field`).
    """
    mixture = parse_mixture(spec, field, require_weights=field == "data.train")
    if kind == "auto":
        kind = _guess_mixture_kind([source for source, _ in mixture], options)
    results = [check_data(source, tokenizer, kind=kind, **options) for source, _ in mixture]
    return MixtureCheck(spec, field, kind, [w for _, w in mixture], results)


def _guess_mixture_kind(sources: list[str], options: dict) -> str:
    guess_options = {k: options[k] for k in ("split", "fmt", "max_record_bytes") if k in options}
    for source in sources:
        try:
            return guess_kind(source, peek=100, **guess_options, strict=True)
        except (DataError, LookupError):  # unreadable or no recognisable record: the next one
            continue
    return "sft"


def format_mixture(check: MixtureCheck) -> str:
    """What a mixture of several sources draws from each, ending in OK or FAILED ("" for one
    source: its own result says it all). Draws follow the weights (`mixture.DrawStream`); a
    source's tokens per draw are its kept tokens per example."""
    if len(check.results) < 2:
        return ""
    means = [r.report.num_tokens / r.report.num_examples if r.report.num_examples else 0.0
             for r in check.results]
    drawn = sum(w * m for w, m in zip(check.weights, means)) or 1.0
    lines = [f"mixture {check.field}={check.spec} ({check.kind}, {len(check.results)} sources, "
             f"{sum(r.report.num_examples for r in check.results):,} examples)",
             f"  {'weight':>7}  {'examples':>9}  {'tokens/example':>14}  {'share of tokens':>15}  "
             f"{'draws per epoch':>15}  source"]
    for r, w, m in zip(check.results, check.weights, means):
        n = r.report.num_examples
        per_epoch = f"{n / w:,.1f}" if n else "-"
        lines.append(f"  {w:>7.1%}  {n:>9,}  {m:>14.1f}  {w * m / drawn:>15.1%}  {per_epoch:>15}  {r.source}")
    lines.append("  (draws per epoch: examples drawn from the whole mixture per pass over that source)")
    failed = [r.source for r in check.results if not r.ok]
    lines.append("mixture OK" if not failed else f"mixture FAILED: {', '.join(failed)} "
                                                 f"{'does' if len(failed) == 1 else 'do'} not check out (above)")
    return "\n".join(lines)


def guess_kind(source: str, *, split: str = "train", fmt: str = "auto", peek: int = 100,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, strict: bool = False) -> str:
    """"dpo" if the first of `peek` records whose format is recognised is a preference
    record (or `fmt` names a preference format), else "sft" (`strict`: LookupError instead
    when no record is recognised). DataError when the source cannot be read."""
    if fmt != "auto":
        return "dpo" if fmt in DPO_FORMATS else "sft"
    records = read_records(source, split=split, max_record_bytes=max_record_bytes)
    for location, record in itertools.islice(records, peek):
        try:
            return "dpo" if detect_format(record, location) in DPO_FORMATS else "sft"
        except DataError:
            continue
    if strict:
        raise LookupError(f"{source}: none of its first {peek} records has a known format")
    return "sft"


def _refit_pairs(examples: list[PreferenceExample], max_length: int, truncation: str):
    """Pairs cut to `max_length` per side as tokenizing at that length would: cutting an
    already cut sequence shorter gives the same tokens, and the prompt ends at the first
    trained token."""
    out = []
    for e in examples:
        sides = []
        for ids, mask in ((e.chosen_ids, e.chosen_mask), (e.rejected_ids, e.rejected_mask)):
            sides.append(fit(ids, mask, int(np.argmax(mask)), max_length, truncation))
        if all(status in ("ok", "truncated") for _, _, status in sides):
            (c, cm, _), (r, rm, _) = sides
            out.append(PreferenceExample(c, cm, r, rm, e.index))
    return out


def format_check_result(result: CheckResult) -> str:
    """A human-readable summary of `result` for the terminal, ending in OK or FAILED."""
    r = result.report
    packed = f", packed: each sequence cut to {result.max_length // 2}" if result.packing else ""
    lines = [f"check-data {result.source} ({result.kind}, max_length {result.max_length}{packed})"]
    if result.fatal is not None:
        return "\n".join(lines + [f"error: {result.fatal}", "FAILED"])
    lines.append(f"records: {r.num_records}   examples: {r.num_examples}   "
                 f"invalid: {r.num_skipped}   truncated: {r.num_truncated}   "
                 f"dropped as too long: {r.num_dropped_too_long} "
                 f"({r.num_prompt_too_long} whose prompt alone fills max_length)")
    lines.append(f"tokens: {r.num_tokens} ({r.num_trained_tokens} trained)")
    if r.num_too_large:
        lines.append(f"dropped unread over data.max_record_bytes: {r.num_too_large} (the first: "
                     f"{r.first_too_large}; raise data.max_record_bytes, 0 = no limit, to train on them)")
    if r.cache and not r.seconds:
        lines.append(f"read from the tokenised cache {r.cache}")
    elif r.seconds:
        lines.append(f"tokenised in {r.seconds:.1f} s ({r.num_records / r.seconds:,.0f} records/s)"
                     + (f"; cached in {r.cache}" if r.cache else ""))
    if r.format_counts:
        lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sorted(r.format_counts.items())))
    if result.length_stats:
        s = result.length_stats
        limit = result.max_length // 2 if result.packing else result.max_length
        over = sum(n > limit for n in r.raw_lengths)
        what = "longer sequence of each pair" if result.kind == "dpo" else "example"
        lines.append(f"tokens per {what} before truncation: p50 {s['p50']}  p90 {s['p90']}  "
                     f"p99 {s['p99']}  max {s['max']}  ({over} over {limit})")
    if result.padding:
        p = result.padding
        lines.append(f"padding without packing: {p['padded']:.1%} padded to max_length, "
                     f"{p['bucketed']:.1%} with length-bucketed batches")
        extra = (f" (each side cut to {result.max_length // 2}; "
                 f"{result.packed_dpo_dropped} more pairs dropped)") if result.kind == "dpo" and not result.packing else ""
        lines.append(f"padding with packing: {p['packed']:.1%}{extra}")
    if r.errors:
        shown = f"first {len(r.errors)} of {r.num_skipped}" if r.num_skipped > len(r.errors) else (
            f"{len(r.errors)}")
        lines.append(f"errors ({shown}):")
        lines += [f"  {loc}: {msg}" for loc, msg in r.errors[:MAX_ERRORS]]
    if result.ok:
        lines.append("OK")
    elif r.num_examples == 0:
        lines.append("FAILED: no usable examples")
    else:
        lines.append(f"FAILED: {r.num_skipped} invalid records (fix them, or train with "
                     "data.skip_invalid=True to skip them)")
    return "\n".join(lines)
