"""Writes that survive a kill at any byte: the new content goes to a temporary name in the same
folder, is flushed to disk, and replaces the target in one `os.replace`. A reader sees the old
file or the new one, never half of either; a killed writer leaves at most a hidden `.tmp-` file
that the next write of the same target removes.

Folders (exports, caches) use `replace_folder`: built under a temporary name, renamed into
place when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

TMP_TAG = ".tmp-"  # in every temporary name written here: `leftovers` finds them


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_TAG}{os.getpid()}-{time.time_ns()}")


def leftovers(target: Path) -> list[Path]:
    """Temporary files or folders that killed writes of `target` left behind."""
    return sorted(target.parent.glob(f".{target.name}{TMP_TAG}*"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replaces `path` with `data` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    for old in leftovers(path):
        _remove(old)
    tmp = _tmp_name(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Replaces `path` with UTF-8 `text` atomically."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def replace_folder(target: str | Path) -> Iterator[Path]:
    """Yields a temporary folder next to `target`; when the block ends without an exception it
    replaces `target` (an existing folder is moved aside first and removed after the rename, so
    a kill in between leaves either the old folder, the new one, or the old one under a
    temporary name next to the new one, never a half-written `target`). On an exception the
    temporary folder is removed and `target` is untouched."""
    target = Path(target)
    if target.is_symlink():  # replace what the link names, and keep the link
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in leftovers(target):
        _remove(old)
    tmp = _tmp_name(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _tmp_name(target)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        _remove(old)
