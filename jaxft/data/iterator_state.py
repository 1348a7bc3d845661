"""What a training data iterator's saved state must match to resume: the state version, the batch
settings and each source's examples (a count and a hash of their tokens).

`pipeline.BatchIterator` and `stream.StreamBatchIterator` both check a restored state with
`check_state`; `data_changes` phrases what changed, one source at a time, for the error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from jaxft.errors import ConfigError, DataError

STATE_VERSION = 1


def data_hash(datasets) -> str:
    """A digest of every example's fields. Examples read from a tokenised cache carry their
    fields' flat arrays (`cache.CachedExamples.flat`): the same bytes, hashed without
    gathering them example by example."""
    h = hashlib.blake2b(digest_size=12)
    for examples in datasets:
        _hash_examples(h, examples)
    return h.hexdigest()


def _hash_examples(h, examples) -> None:
    """Feeds one source's examples (every field, lengths and tokens) into hash `h`."""
    flat = getattr(examples, "flat", None)
    for field in dataclasses.fields(examples[0]):
        if field.name == "index":
            h.update(np.array([e.index for e in examples], np.int64).tobytes())
        elif flat is not None:
            tokens, offsets = flat[field.name]
            h.update(np.diff(offsets).astype(np.int64).tobytes())
            h.update(np.ascontiguousarray(tokens, np.int32).tobytes())
        else:
            arrays = [np.asarray(getattr(e, field.name), np.int32) for e in examples]
            h.update(np.array([len(a) for a in arrays], np.int64).tobytes())
            h.update(np.concatenate(arrays).tobytes())


def source_hash(examples) -> str:
    """A digest of one source's examples (its entry in the state's "data")."""
    h = hashlib.blake2b(digest_size=12)
    _hash_examples(h, examples)
    return h.hexdigest()


def data_changes(saved: list[dict], now: list[dict], describe) -> list[str]:
    """What changed between two lists of per-source records ({"source", ...}), one phrase a
    changed source: sources added or removed, else `describe(old, new)` for each source whose
    record differs (None when it does not)."""
    names = lambda records: [r["source"] for r in records]  # noqa: E731
    if names(saved) != names(now):
        return [f"sources {names(saved)} -> {names(now)}"]
    return [f"source {new['source']!r}: {describe(old, new)}" for old, new in zip(saved, now)
            if describe(old, new)]


def examples_change(old: dict, new: dict) -> str | None:
    """How one source's {"num_examples", "hash"} record changed (a `data_changes` describe)."""
    if old["num_examples"] != new["num_examples"]:
        return f"{old['num_examples']} -> {new['num_examples']} examples"
    if old["hash"] != new["hash"]:
        return f"the same {new['num_examples']} examples, other tokens (an edited record, or another tokenizer or chat template)"
    return None


def check_state(state: dict[str, Any], *, streaming: bool, settings: dict) -> None:
    """Raises ValueError, saying what to do, unless `state` (a `get_state()` of an in-memory or,
    `streaming`, a `stream.StreamBatchIterator`) was written by this kind of iterator, by this
    state version and with these batch `settings`. The data's own check is the caller's."""
    saved_streaming = bool(state.get("streaming"))
    if saved_streaming != streaming:
        raise ConfigError("cannot resume the data iterator: the checkpoint was written with "
                         f"data.streaming={saved_streaming}; resume with data.streaming={saved_streaming} "
                         "or start a new workdir")
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data iterator state version {state.get('version')} is not "
                         f"{STATE_VERSION}; it was written by another jaxft version")
    saved = state["settings"]
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(
            "cannot resume the data iterator: the batch settings changed since the "
            f"checkpoint ({'; '.join(changed)}). Resume with the original settings or "
            "start a new workdir.")
