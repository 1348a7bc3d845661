"""Read raw records from wherever a dataset lives, each with a human coordinate.

`read_records(source)` yields `(location, record)` pairs; `location` is what an error message
puts in front of its text, so a user can open the file at the right place:

    data/train.jsonl line 812       JSONL (and JSON-lines .json), 1-based like an editor
    data/train.json index 3         the 4th record of a JSON list / {"data": [...]}
    data/train.csv line 17          the line where the CSV row starts (1 = the header)
    data/train.parquet row 3        0-based row
    data/saved index 17             a `datasets.save_to_disk` folder (`data/saved[test]` for
                                    a split of a DatasetDict); 0-based like `ds[17]`
    org/name[train] index 17        a hub dataset

A source is a file, a glob (`data/*.jsonl`, files in sorted order), a folder holding data
files (read in sorted order), a `save_to_disk` folder, or a hub name. JSON and JSONL are read
here, not by `datasets`, so that invalid JSON and non-UTF-8 bytes are reported with their file
and line instead of an Arrow stack trace. Problems with the source itself (missing file,
unknown extension, unreachable hub name) raise `DataError` naming the source.

This is the one reader of a user's text files: training (in memory and streamed), check-data,
`jaxft eval --data / --pairs`, `jaxft generate --prompts` and compare all read through it, so
they accept the same files: UTF-8 with or without a byte-order mark, LF or CRLF line ends, and
JSONL / JSON / CSV compressed by their suffix (`train.jsonl.gz` gzip, `train.jsonl.zst` zstd,
which needs `pip install zstandard`). A file whose bytes disagree with its name (gzip data
named .jsonl, a Parquet or zip file named .jsonl, UTF-16 text, any file with NUL bytes where
text should be) is refused naming the file and what it is (`jaxft.data.text_files` opens each file, and its
`read_json` reads one JSON document with the same error form).

Tabular files (CSV, Parquet) can hold a message list only as its JSON text (pandas writes
`[{"role": "user", ...}]` into a cell), so a `messages` / `prompt` / `completion` / `chosen` /
`rejected` string cell that starts like a JSON list of objects (`[{`) is decoded into the list;
one that then fails to parse is an error naming the row and field. JSON and JSONL strings stay
text: nested values are written as such there.

`max_record_bytes` bounds what one record may hold (a tokenizer takes 100-250 bytes of memory
per character): a JSONL line longer than that is never held whole (read in bounded chunks and
skipped), and a record of any other source whose strings add up to more is let go; either is
yielded as a `RecordTooLargeError` in place of the record, for the caller to count and drop.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from jaxft.data.data_error import DataError
from jaxft.data.text_files import (
    BOM, COMPRESSIONS, JSON_LINES, UnreadableFileError, damaged_error, json_document, open_data_file, split_name,
)
from jaxft.data.text_files import read_json  # noqa: F401 (public here too, as before)
from jaxft.errors import ConfigError

# Extensions read as data files. `.ndjson` is JSONL under another name.
JSONL_EXTS = (".jsonl", ".ndjson")
FILE_EXTS = JSONL_EXTS + (".json", ".parquet", ".csv")
# data.max_record_bytes' default: ~250k tokens, past most max_lengths, < 300 MB to tokenize.
DEFAULT_MAX_RECORD_BYTES = 1 << 20
# Fields that hold a message list in the conversational formats (decoded from tabular cells).
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
_JSON_LIST_OF_OBJECTS = re.compile(r"\s*\[\s*\{")
_GLOB_CHARS = "*?["
_SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping an over-long line
# csv's own limit (128 KiB a cell) would fail a whole file on one long cell; records are bounded
# by max_record_bytes instead. 2**31 - 1: the largest a C long takes on every platform.
_CSV_FIELD_LIMIT = 2**31 - 1


class RecordTooLargeError(DataError):
    """A record over max_record_bytes, yielded in its place: dropped and counted, not invalid."""


def read_records(source: str, *, split: str = "train",
                 max_record_bytes: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield `(location, record)` for every record of `source`, in a deterministic order.

    Args:
      source: a file (.jsonl/.ndjson/.json/.parquet/.csv), a glob, a folder of such files,
        a `datasets.save_to_disk` folder, or a Hugging Face hub dataset name.
      split: the split to read from a saved DatasetDict or a hub dataset.
      max_record_bytes: > 0: records over this many bytes (a JSONL line; elsewhere the UTF-8
        bytes of the record's strings) come as `RecordTooLargeError`; 0: no limit.

    Yields:
      The record's coordinate (see the module docstring) and the record. A record is
      whatever the file holds (usually a dict); the format layer rejects anything else.
      A JSONL line that is not UTF-8 or not JSON, a tabular cell that looks like a JSON
      message list but is not JSON, and a record over `max_record_bytes` are yielded as a
      `DataError` instance in place of the record, so that a caller may skip it and read on.
      A file that is not what its name says, or whose compressed data breaks off, is yielded
      as an `UnreadableFileError` in place of its (next) record, and the file is left there.

    Raises:
      DataError: the source does not exist or cannot be read as a whole (naming it, and the
        line for a broken .json document or CSV file).
    """
    if max_record_bytes < 0:
        raise ConfigError(f"data.max_record_bytes must be >= 0 (0 = no limit), got {max_record_bytes}")
    source, limit = str(source), max_record_bytes
    path = Path(os.path.expanduser(source))
    if any(c in source for c in _GLOB_CHARS) and not path.exists():
        files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise DataError(source, "no files match this pattern")
        for f in files:
            yield from _read_file(Path(f), f, limit)
    elif path.is_dir():
        yield from _read_folder(path, source, split, limit)
    elif path.is_file():
        yield from _read_file(path, source, limit)
    elif _looks_local(source):
        raise DataError(source, "file not found")
    else:
        yield from _read_hub(source, split, limit)


def _looks_local(source: str) -> bool:
    """A source that can only be meant as a local path (a hub name has none of these)."""
    return (source.startswith(("/", ".", "~")) or split_name(source)[0] in FILE_EXTS
            or source.count("/") > 1)


def looks_local(source: str) -> bool:
    """Whether `read_records` reads `source` from this disk (a file, folder or glob; not a
    hub name)."""
    return (os.path.exists(os.path.expanduser(source)) or any(c in source for c in _GLOB_CHARS)
            or _looks_local(source))


def is_data_file(path: str | os.PathLike) -> bool:
    """Whether a folder's file is read as data (by its name; see FILE_EXTS and COMPRESSIONS)."""
    return split_name(path)[0] in FILE_EXTS


def _read_file(path: Path, display: str, limit: int) -> Iterator[tuple[str, dict]]:
    ext, compression = split_name(path.name)
    if ext not in _READERS:
        shown = "".join(PurePath(path.name.lower()).suffixes[-2:]) if compression else ext
        raise DataError(display, f"unsupported file type {shown or '(no extension)'!r}; use one of "
                                 f"{', '.join(FILE_EXTS)}, JSONL / JSON / CSV optionally compressed "
                                 f"({', '.join(e for e in COMPRESSIONS)})")
    if compression and ext == ".parquet":
        raise DataError(display, f"a {compression}-compressed Parquet file cannot be read: Parquet "
                                 "compresses its own columns; decompress the file (or write it with "
                                 "compression inside)")
    where = display
    try:
        for where, record in _READERS[ext](path, display, limit):
            yield where, record
    except UnreadableFileError as err:
        yield display, err
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        yield where, damaged_error(display, where, compression, err)
    except Exception as err:  # zstandard.ZstdError, or an OSError while reading
        if type(err).__name__ != "ZstdError" and not isinstance(err, OSError):
            raise
        yield where, damaged_error(display, where, compression, err)


def _too_large(location: str, size: int, limit: int) -> RecordTooLargeError:
    return RecordTooLargeError(location, f"the record is {size:,} bytes, over data.max_record_bytes "
                                         f"({limit:,}): dropped (raise data.max_record_bytes, "
                                         "0 = no limit, to train on it)")


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, the line's bytes or None when it is over `limit`, its size without the
    line ending). An over-long line is read past in bounded chunks, never held whole."""
    for lineno in itertools.count(1):
        raw = f.readline(limit + 1) if limit else f.readline()
        if not raw:
            return
        if not limit or len(raw) <= limit or raw.endswith(b"\n"):
            yield lineno, raw, len(raw.rstrip(b"\r\n"))
            continue
        size = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(_SKIP_CHUNK)
            size += len(raw)
        yield lineno, None, size - len(raw) + len(raw.rstrip(b"\r\n"))


def _read_jsonl(path: Path, display: str, limit: int = 0) -> Iterator[tuple[str, dict]]:
    """One JSON value per line, streamed; blank lines are skipped (editors leave a trailing
    one) and a UTF-8 byte-order mark on line 1 is ignored."""
    with open_data_file(path, display) as f:
        for lineno, raw, size in _lines(f, limit):
            location = f"{display} line {lineno}"
            if raw is None:
                yield location, _too_large(location, size, limit)
                continue
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield location, DataError(location, f"not valid UTF-8 (byte {raw[err.start]:#04x} "
                                                    f"at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield location, DataError(location, f"invalid JSON: {err.msg} (column {err.colno})")
                continue
            yield location, record


def _read_json(path: Path, display: str, limit: int) -> Iterator[tuple[str, dict]]:
    """A list of records, {"data": [...]}, one record, or JSON lines under a .json name."""
    value = json_document(path, display)
    if value is JSON_LINES:  # read again line by line, each line bounded
        yield from _read_jsonl(path, display, limit)
        return
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, dict):
        yield f"{display} index 0", _bounded(value, f"{display} index 0", limit)
    elif isinstance(value, list):
        for i, record in enumerate(value):
            yield f"{display} index {i}", _bounded(record, f"{display} index {i}", limit)
    else:
        raise DataError(display, "expected a list of records, {\"data\": [records]} or "
                                 f"one record per line; got a JSON {type(value).__name__}")


def _read_csv(path: Path, display: str, limit: int) -> Iterator[tuple[str, dict]]:
    """Header row + one record per row; every value is a string (CSV has no other type), a
    JSON message list included (decoded, see `_tabular`)."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with open_data_file(path, display) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig",
                                                                 newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise DataError(f"{display} line {reader.line_num + 1}",
                                "not valid UTF-8") from None
            except csv.Error as err:
                raise DataError(f"{display} line {reader.line_num}", f"invalid CSV: {err}") from None
            location = f"{display} line {start}"
            if None in row:  # more cells than header names
                row = DataError(location, "the row has more cells than the header has names")
            yield location, _tabular(row, location, limit)
            start = reader.line_num + 1


def _read_parquet(path: Path, display: str, limit: int) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(display, f"cannot read Parquet: {err}") from None
    row = 0
    # Batches keep a big file from being turned into Python objects all at once.
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            location = f"{display} row {row}"
            yield location, _tabular(record, location, limit)
            row += 1


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
            ".parquet": _read_parquet, ".csv": _read_csv}


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the strings in `value` (dicts and lists walked)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


def _bounded(record: Any, location: str, limit: int) -> Any:
    """`record`, or a RecordTooLargeError when its strings add up to more than `limit` bytes."""
    if limit and not isinstance(record, DataError):
        size = _text_bytes(record)
        if size > limit:
            return _too_large(location, size, limit)
    return record


def _tabular(record: Any, location: str, limit: int) -> Any:
    """A CSV / Parquet row, bounded, with its JSON message-list cells decoded (the module
    docstring); a cell that looks like one but is not JSON gives a DataError naming it."""
    record = _bounded(record, location, limit)
    if not isinstance(record, dict):
        return record
    decoded = dict(record)
    for field in MESSAGE_FIELDS:
        cell = record.get(field)
        if not isinstance(cell, str) or not _JSON_LIST_OF_OBJECTS.match(cell):
            continue
        try:
            decoded[field] = json.loads(cell)
        except json.JSONDecodeError as err:
            return DataError(location, f"field {field!r} starts like a JSON list of messages ('[{{') "
                                       f"but is not valid JSON ({err.msg}, column {err.colno}); fix "
                                       "the JSON, or store the dataset as JSONL to keep it as text",
                             field=field)
    return decoded


def _read_folder(path: Path, display: str, split: str, limit: int) -> Iterator[tuple[str, dict]]:
    if _is_saved_dataset(path):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises FileNotFoundError, ValueError, ...
            raise DataError(display, f"cannot load the saved dataset: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(display, f"has no split {split!r}; it has {sorted(ds)}")
            ds, display = ds[split], f"{display}[{split}]"
        yield from _iter_dataset(ds, display, limit)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.name))
    if not files:
        raise DataError(display, "folder holds no data files (" + ", ".join(FILE_EXTS)
                        + ", JSONL / JSON / CSV also as .gz or .zst) and is not a "
                        "datasets.save_to_disk folder")
    for f in files:
        yield from _read_file(f, str(Path(display) / f.relative_to(path)), limit)


def _iter_dataset(ds, display: str, limit: int) -> Iterator[tuple[str, dict]]:
    for i, record in enumerate(ds):
        location = f"{display} index {i}"
        yield location, _bounded(record, location, limit)


def _read_hub(name: str, split: str, limit: int) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown repo, gated, bad split: all the same to us
        raise DataError(name, "not a local file or folder, and not a hub dataset that could be "
                              f"loaded ({type(err).__name__}: {err})") from None
    yield from _iter_dataset(ds, f"{name}[{split}]", limit)
