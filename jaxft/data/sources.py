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
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from jaxft.data.formats import DataError

# Extensions read as data files. `.ndjson` is JSONL under another name.
JSONL_EXTS = (".jsonl", ".ndjson")
FILE_EXTS = JSONL_EXTS + (".json", ".parquet", ".csv")
_GLOB_CHARS = "*?["
_BOM = b"\xef\xbb\xbf"


def read_records(source: str, *, split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield `(location, record)` for every record of `source`, in a deterministic order.

    Args:
      source: a file (.jsonl/.ndjson/.json/.parquet/.csv), a glob, a folder of such files,
        a `datasets.save_to_disk` folder, or a Hugging Face hub dataset name.
      split: the split to read from a saved DatasetDict or a hub dataset.

    Yields:
      The record's coordinate (see the module docstring) and the record. A record is
      whatever the file holds (usually a dict); the format layer rejects anything else.
      A JSONL line that is not UTF-8 or not JSON is yielded as a `DataError` instance in
      place of the record, so that a caller may skip it and read on.

    Raises:
      DataError: the source does not exist or cannot be read as a whole (naming it, and the
        line for a broken .json document or CSV file).
    """
    source = str(source)
    path = Path(os.path.expanduser(source))
    if any(c in source for c in _GLOB_CHARS) and not path.exists():
        files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise DataError(source, "no files match this pattern")
        for f in files:
            yield from _read_file(Path(f), display=f)
    elif path.is_dir():
        yield from _read_folder(path, source, split)
    elif path.is_file():
        yield from _read_file(path, display=source)
    elif _looks_local(source):
        raise DataError(source, "file not found")
    else:
        yield from _read_hub(source, split)


def _looks_local(source: str) -> bool:
    """A source that can only be meant as a local path (a hub name has none of these)."""
    return (source.startswith(("/", ".", "~")) or source.lower().endswith(FILE_EXTS)
            or source.count("/") > 1)


def _read_file(path: Path, display: str) -> Iterator[tuple[str, dict]]:
    ext = path.suffix.lower()
    if ext in JSONL_EXTS:
        yield from _read_jsonl(path, display)
    elif ext == ".json":
        yield from _read_json(path, display)
    elif ext == ".parquet":
        yield from _read_parquet(path, display)
    elif ext == ".csv":
        yield from _read_csv(path, display)
    else:
        raise DataError(display, f"unsupported file type {ext or '(no extension)'!r}; "
                                 f"use one of {', '.join(FILE_EXTS)}")


def _read_jsonl(path: Path, display: str) -> Iterator[tuple[str, dict]]:
    """One JSON value per line, streamed; blank lines are skipped (editors leave a trailing
    one) and a UTF-8 byte-order mark on line 1 is ignored."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{display} line {lineno}"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
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


def _read_json(path: Path, display: str) -> Iterator[tuple[str, dict]]:
    """A list of records, {"data": [...]}, one record, or JSON lines under a .json name."""
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{display} line {line}",
                        f"not valid UTF-8 (byte {data[err.start]:#04x})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values, one a line: JSON lines
            yield from _read_jsonl(path, display)
            return
        raise DataError(f"{display} line {err.lineno}",
                        f"invalid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, dict):
        yield f"{display} index 0", value
    elif isinstance(value, list):
        for i, record in enumerate(value):
            yield f"{display} index {i}", record
    else:
        raise DataError(display, "expected a list of records, {\"data\": [records]} or "
                                 f"one record per line; got a JSON {type(value).__name__}")


def _read_csv(path: Path, display: str) -> Iterator[tuple[str, dict]]:
    """Header row + one record per row; every value is a string (CSV has no other type)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
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
            yield location, row
            start = reader.line_num + 1


def _read_parquet(path: Path, display: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(display, f"cannot read Parquet: {err}") from None
    row = 0
    # Batches keep a big file from being turned into Python objects all at once.
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{display} row {row}", record
            row += 1


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_folder(path: Path, display: str, split: str) -> Iterator[tuple[str, dict]]:
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
        yield from _iter_dataset(ds, display)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_EXTS)
    if not files:
        raise DataError(display, "folder holds no data files (" + ", ".join(FILE_EXTS)
                        + ") and is not a datasets.save_to_disk folder")
    for f in files:
        yield from _read_file(f, display=str(Path(display) / f.relative_to(path)))


def _iter_dataset(ds, display: str) -> Iterator[tuple[str, dict]]:
    for i, record in enumerate(ds):
        yield f"{display} index {i}", record


def _read_hub(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown repo, gated, bad split: all the same to us
        raise DataError(name, "not a local file or folder, and not a hub dataset that could be "
                              f"loaded ({type(err).__name__}: {err})") from None
    yield from _iter_dataset(ds, f"{name}[{split}]")
