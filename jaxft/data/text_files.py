"""Opening one text file a user gives jaxft: compression by suffix, bytes checked against the name.

`open_data_file` opens a data file as bytes, decompressing `.gz` (gzip) and `.zst` (zstd, which
needs `pip install zstandard`) by the file's last suffix, and refuses, naming the file and what it
is, one whose bytes disagree with its name: compressed data under a name without the suffix (or
the reverse), UTF-16 text, a Parquet or zip file, NUL bytes in the first line. `read_json` reads
one JSON document (an adapter_config.json, a run's config.json, sweep.json) with the same error
form, file and line. `jaxft.data.sources` reads records through both.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import zlib
from pathlib import Path, PurePath
from typing import Any

from jaxft.data.data_error import DataError
from jaxft.errors import PathError

# Compression, by the last suffix (`train.jsonl.gz`), and the bytes such a file starts with.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
_SNIFF = 4096  # bytes looked at to tell text from a binary file
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark, ignored at the start of a file


class UnreadableFileError(DataError):
    """A file that is not what its name says (binary, UTF-16, compressed under another suffix)
    or whose compressed data breaks off. `read_records` yields it in place of the file's (next)
    record and reads no further in that file: raised by callers, or skipped with
    data.skip_invalid like an invalid record."""


def split_name(name: str | os.PathLike) -> tuple[str, str | None]:
    """(data extension, compression or None) of a file name, lower case:
    "train.jsonl.gz" -> (".jsonl", "gzip"), "train.csv" -> (".csv", None)."""
    p = PurePath(str(name).lower())
    compression = COMPRESSIONS.get(p.suffix)
    if compression:
        p = PurePath(p.stem)
    return p.suffix, compression


def damaged_error(display: str, where: str, compression: str | None, err: BaseException) -> DataError:
    after = f" after {where}" if where != display else ""
    what = f"the {compression} data is damaged or truncated" if compression else "cannot be read"
    return UnreadableFileError(display, f"{what}{after} ({type(err).__name__}: {err}); "
                                        "re-create or re-download the file")


def _zstd_reader(raw, display: str):
    try:
        import zstandard
    except ImportError:
        raise DataError(display, "is zstd-compressed (.zst) and reading it needs the zstandard "
                                 "package: pip install zstandard (or decompress it: zstd -d)") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                        closefd=False),
                             buffer_size=1 << 16)


@contextlib.contextmanager
def open_data_file(path: str | os.PathLike, display: str | None = None):
    """Text file `path` opened for reading as bytes, decompressed by its suffix (.gz, .zst).
    Refused with an UnreadableFileError naming the file: compressed bytes under a name without
    that suffix (or the reverse), a file that is not text (a NUL byte in its first line, UTF-16,
    Parquet, zip)."""
    path = Path(path)
    display = str(path) if display is None else display
    compression = split_name(path.name)[1]
    with open(path, "rb") as raw:
        head = raw.read(8)
        found = next((name for name, magic in _MAGIC.items() if head.startswith(magic)), None)
        if found != compression:
            raise UnreadableFileError(display, _misnamed(path.name, found, compression))
        raw.seek(0)
        if compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == "zstd":
            stream = _zstd_reader(raw, display)
        else:
            stream = raw
        with stream:
            try:
                head = stream.peek(_SNIFF)[:_SNIFF]
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                raise damaged_error(display, display, compression, err) from None
            problem = _not_text(head)
            if problem:
                raise UnreadableFileError(display, problem)
            yield stream


def _misnamed(name: str, found: str | None, named: str | None) -> str:
    suffix = {v: k for k, v in COMPRESSIONS.items()}
    if named is None:
        return (f"is {found}-compressed but its name does not end in {suffix[found]}: rename it to "
                f"{name}{suffix[found]} (or decompress it)")
    stem = name[:-len(suffix[named])]
    return (f"ends in {suffix[named]} but is not {named}-compressed"
            + (f" (it is {found}-compressed)" if found else "") + f": rename it to {stem}"
            + (suffix[found] if found else ""))


def _not_text(head: bytes) -> str | None:
    """What is wrong with a text file that starts with `head`, or None. The start decides: a NUL
    byte in a later line (a block of zeros a crash left) is that line's problem, not the file's."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ("is UTF-16 text; jaxft reads UTF-8: save it as UTF-8 "
                "(e.g. iconv -f UTF-16 -t UTF-8 IN > OUT)")
    if head.startswith(b"PAR1"):
        return "is a Parquet file: give it the .parquet extension"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive, not text: unzip it and give the data file inside"
    nul = head.split(b"\n", 1)[0].find(b"\0")
    if nul >= 0:
        return (f"is a binary file, not text (a NUL byte at byte {nul}); give a JSONL, JSON, CSV or "
                "Parquet file (UTF-8 text)")
    return None


JSON_LINES = object()  # what `json_document` returns for several values, one a line


def json_document(path: Path, display: str, *, lines: bool = True) -> Any:
    """The JSON value of a whole .json file, or (with `lines`) JSON_LINES when it holds JSON
    lines."""
    with open_data_file(path, display) as f:
        data = f.read()
    if not data.strip():
        raise DataError(display, "the file is empty; expected a JSON document")
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{display} line {line}",
                        f"not valid UTF-8 (byte {data[err.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and lines:  # several values, one a line: JSON lines
            return JSON_LINES
        raise DataError(f"{display} line {err.lineno}",
                        f"invalid JSON: {err.msg} (column {err.colno})") from None


def read_json(path: str | os.PathLike, *, what: str = "", expect: type | None = dict) -> Any:
    """The JSON document in file `path` (a config.json, an adapter_config.json, sweep.json): one
    value, read as data files are (UTF-8 with or without a byte-order mark, .gz / .zst by suffix).

    Args:
      what: how errors name the file's role, e.g. "lora.init_from" ("" = the path alone).
      expect: the type the document must have (default: an object; None: any).

    Raises:
      FileNotFoundError: no such file, naming it.
      DataError: not JSON, not UTF-8, empty, or not `expect`: "PATH line N: invalid JSON: ...".
    """
    path = Path(path)
    display = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise PathError(f"{display}: " + ("is a folder, not a JSON file" if path.is_dir()
                                                  else "file not found"))
    value = json_document(path, display, lines=False)
    if expect is not None and not isinstance(value, expect):
        names = {dict: "a JSON object ({...})", list: "a JSON list ([...])"}
        raise DataError(display, f"expected {names.get(expect, expect.__name__)}, got a JSON "
                                 f"{type(value).__name__}; the file is damaged or not the one meant")
    return value
