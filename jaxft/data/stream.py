"""Training batches from sources read as streams (`data.streaming=True`): bounded memory for
sources of any size, the same batches, layout and resume guarantees as `pipeline.BatchIterator`.

Each source is an `ExampleStream` (`stream_source.py`): its examples in file order, shuffled
within windows of `data.shuffle_buffer` examples, the source read again (reshuffled) when it
ends. The global batch stream is laid out as the in-memory pipeline lays out its draws:
* Draw p comes from source `DrawStream.dataset_of(p)` (i.i.d. with the mixture weights, the
  in-memory mixture's own draws); each source hands out its next example.
* Draws are cut into chunks of `shuffle_buffer` draws; a chunk is packed (best-fit decreasing,
  rows shuffled) or grouped by length, by `packing.py`'s functions with the in-memory rng, and
  cut into global batches of `train.batch_size` units. With one source a chunk never crosses
  the end of a pass, and the last batch of a pass is filled with empty rows: every example is
  used exactly once per epoch, as in memory.
* Every host reads and tokenises every record and keeps its slice of each global batch
  (`BatchLayout`): the global batch is the one a single host would build, on any number of hosts.
Memory: each source's current window and the current chunk, never the source.

A stream's length is unknown until it has been read, so a run counts optimizer steps
(`train.steps`); `train.epochs` and `train.eval_every=-1` need the in-memory pipeline.

State (`get_state`, saved with every checkpoint): {"version", "streaming": True, "position"
(draws before the current chunk), "sources" (each stream's position at the chunk's start, see
`ExampleStream.get_state`), "row" (units of the chunk already used), "batches", "real_tokens",
"slot_tokens", "settings", "data" (each source's {"source", "fingerprint", "files", "tokenizer",
"settings"}: `cache.fingerprint`'s inputs, so a refused resume names the file, the tokenizer or
the setting that changed), "fingerprint"}. `set_state` continues with exactly the next batch.

data.skip_invalid is left out of a source's identity: a run that stopped at an invalid record
(as a stream does when it reaches one) resumes with data.skip_invalid=True (docs/data.md, "Streaming sources").
That is exact: the stopped run never handed out an example of the window holding the record, so
every batch up to the checkpoint is the one a run with skip_invalid=True from the start made;
turning it off again can only stop the run at the next invalid record, naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxft.data.iterator_state import STATE_VERSION, check_state, data_changes
from jaxft.data.mixture import DrawStream, parse_mixture, seeded_rng
from jaxft.data.packing import (
    DEFAULT_MAX_SEGMENTS, BatchLayout, group_by_length, pack_lengths, row_lengths, unit_lengths)
from jaxft.data.pipeline import check_max_segments
from jaxft.data.progress import BatchProgress
from jaxft.data.stream_source import ExampleStream
from jaxft.errors import ConfigError, DataError

_TAG_ROWS = 0x726F7773  # the in-memory pipeline's tag: a chunk of the same draws is laid out alike
_NO_REFERENCE_PASS = (
    "config key dpo.precompute_reference: a streaming source (data.streaming=True) is not held "
    "in memory for a reference pass; set dpo.precompute_reference=False or data.streaming=False")


class StreamBatchIterator(BatchProgress):
    """Infinite, deterministic, resumable stream of one host's fixed-shape batches, read from
    `streams` (one `ExampleStream` per source). Same interface as `pipeline.BatchIterator`
    (next, get_state / set_state, real_tokens, padding_fraction, epoch), without a length.

    Example keys (`example_index`, `pair_index`): the record index for one source; in a
    mixture, `index * len(streams) + source` (unique without knowing the sources' sizes).
    """

    def __init__(self, streams: Sequence[ExampleStream], *, kind: str, global_batch_size: int,
                 max_length: int, pad_id: int, packing: bool = False, seed: int = 0,
                 weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
                 process_index: int = 0, process_count: int = 1,
                 max_segments_per_row: int = DEFAULT_MAX_SEGMENTS, data: Sequence[dict] = ()):
        if kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ConfigError(
                f"train.batch_size ({global_batch_size}) must be a positive multiple of the "
                f"number of processes ({process_count}): each host loads an equal slice of the batch")
        self.streams = list(streams)
        self.names = list(names or [s.source for s in self.streams])
        weights = [1.0] * len(self.streams) if weights is None else list(weights)
        # Only `dataset_of` is used: it needs no sizes (those are for in-memory permutations).
        self._mix = DrawStream([1] * len(self.streams), weights, seed)
        self._seed, self._batch = int(seed), global_batch_size
        self._chunk_size = self.streams[0].window_size
        self._per_row = max_segments_per_row // (2 if kind == "dpo" else 1)
        if packing:
            check_max_segments(kind, max_segments_per_row)
        self._start_progress(BatchLayout(kind, packing, max_length, pad_id, max_segments_per_row,
                                         process_index, process_count), max_segments_per_row)
        self._settings = json.loads(json.dumps({
            "kind": kind, "global_batch_size": global_batch_size, "max_length": max_length,
            "packing": packing, "seed": seed, "weights": self._mix.weights.tolist(),
            "max_segments_per_row": max_segments_per_row, "shuffle_buffer": self._chunk_size}))
        self._data = {"sources": list(data) or [{"source": n, "fingerprint": n} for n in self.names]}
        self._fingerprint = hashlib.blake2b(
            json.dumps([self._settings, self._data], sort_keys=True).encode(),
            digest_size=12).hexdigest()
        self._position, self._row = 0, 0
        self._start = [s.get_state() for s in self.streams]  # stream positions at the chunk's start
        self._units: list | None = None  # the current chunk's units, built on demand
        self._period_end, self._draws = False, 0
        self.reports = {name: s.report for name, s in zip(self.names, self.streams)}

    # -- the stream ------------------------------------------------------------------------

    def _chunk(self) -> None:
        """Draws the current chunk from the streams (at `self._start`) and lays it out."""
        n = len(self.streams)
        if n == 1:  # one source: a chunk stops at the end of its pass
            examples, self._period_end = self.streams[0].take(self._chunk_size,
                                                             stop_at_epoch_end=True)
            sources = np.zeros(len(examples), np.int64)
        else:
            sources = self._mix.dataset_of(self._position, self._chunk_size)
            taken = [iter(self.streams[d].take(int((sources == d).sum()))[0]) for d in range(n)]
            examples = [next(taken[d]) for d in sources.tolist()]
            self._period_end = False
        self._check(examples, sources)
        lengths = (unit_lengths if self._layout.packing else row_lengths)(examples)
        rng = seeded_rng(self._seed, _TAG_ROWS, self._position)
        if not examples:
            order = []
        elif self._layout.packing:
            rows = pack_lengths(lengths, self._layout.max_length, self._per_row)
            order = [rows[i] for i in rng.permutation(len(rows))]
        else:
            order = [[u] for u in group_by_length(lengths, self._batch, rng).tolist()]
        self._units = [[(examples[i], self._key(examples[i], int(sources[i]))) for i in unit]
                       for unit in order]
        self._draws = len(examples)

    def _check(self, examples, sources) -> None:
        """ValueError for an example over max_length (tokenize truncates or drops those)."""
        limit = self._layout.max_length
        for example, d in zip(examples, sources.tolist()):
            need = len(example) if self._layout.packing else int(row_lengths([example])[0])
            if need > limit:
                raise ValueError(
                    f"source {self.names[d]!r} example {example.index} needs {need} "
                    f"tokens, more than max_length {limit}" +
                    (" (a packed DPO pair holds chosen + rejected)" if self._layout.packing else ""))

    def _key(self, example, source: int) -> int:
        n = len(self.streams)
        return example.index if n == 1 else example.index * n + source

    def _next_units(self) -> list:
        units: list = []
        while len(units) < self._batch:
            if self._units is None:
                self._chunk()
            take = min(self._batch - len(units), len(self._units) - self._row)
            units += self._units[self._row:self._row + take]
            self._row += take
            if self._row == len(self._units):
                ended = self._period_end
                self._position += self._draws
                self._start = [s.get_state() for s in self.streams]
                self._units, self._row = None, 0
                if ended and units:  # pad the last batch of a pass (an empty tail is skipped)
                    break
        return units + [[] for _ in range(self._batch - len(units))]

    # -- progress (tokens, padding, epoch: `BatchProgress`) ---------------------------------

    @property
    def dataset_epochs(self) -> dict[str, int]:
        """Completed passes over each source (as of the current chunk's start)."""
        return {name: int(s["epoch"]) for name, s in zip(self.names, self._start)}

    def batches_per_epoch(self) -> int:
        raise ConfigError(
            "a streaming source (data.streaming=True) has no known length: set train.steps "
            "(not train.epochs) and a train.eval_every > 0 (not -1), or data.streaming=False")

    def one_pass(self, batch_size: int):
        raise ConfigError(_NO_REFERENCE_PASS)

    # -- state -----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; `set_state` on it continues with exactly the next batch."""
        return {"version": STATE_VERSION, "streaming": True, "position": self._position,
                "sources": [dict(s) for s in self._start], "row": self._row, **self._progress_state(),
                "settings": dict(self._settings), "data": dict(self._data),
                "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore `get_state()` output; ValueError if the data or batch settings changed."""
        check_state(state, streaming=True, settings=self._settings)
        saved = state["data"]["sources"]
        if saved and all(isinstance(s, str) for s in saved):  # an older jaxft: one hex a source
            now = [s["fingerprint"] for s in self._data["sources"]]
            changed = [] if saved == now else [  # (equal for hub datasets, known by name)
                f"the checkpoint, written by an older jaxft, keeps one fingerprint of each source "
                f"({', '.join(self.names)}) that this jaxft computes differently (it hashes every byte "
                "of a file); resume with the jaxft that wrote it"]
        else:
            changed = data_changes(saved, self._data["sources"], _source_change)
        if changed:
            raise DataError(
                "cannot resume the data iterator: the training data changed since the checkpoint ("
                + "; ".join(changed) + "). Resume with the original data or start a new workdir.")
        self._position, self._row = int(state["position"]), int(state["row"])
        self._start = [dict(s) for s in state["sources"]]
        for stream, position in zip(self.streams, self._start):
            stream.set_state(position)
        self._units = None
        self._set_progress_state(state)


def make_stream_iterator(sources: str, tokenizer, *, kind: str, global_batch_size: int,
                         max_length: int, packing: bool, seed: int, shuffle_buffer: int,
                         process_index: int = 0, process_count: int = 1,
                         load_kwargs: dict | None = None,
                         max_segments_per_row: int = DEFAULT_MAX_SEGMENTS) -> StreamBatchIterator:
    """The streaming counterpart of `pipeline.make_train_iterator`: `sources` is a
    `data.train` mixture spec, `load_kwargs` the `load_examples` options (those about caches
    and worker processes do not apply to a stream)."""
    from jaxft.data.cache import fingerprint
    from jaxft.data.pipeline import pad_id_of

    options = {k: v for k, v in (load_kwargs or {}).items()
               if k in ("fmt", "truncation", "skip_invalid", "completion_only_loss",
                        "chat_template", "split", "max_record_bytes")}
    # A packed DPO pair shares one row, so each sequence gets at most half of it (as in memory).
    seq_length = max_length // 2 if kind == "dpo" and packing else max_length
    mixture = parse_mixture(sources, "data.train")
    streams = [ExampleStream(source, tokenizer, kind=kind, max_length=seq_length,
                             window=shuffle_buffer, seed=seed, source_id=d, **options)
               for d, (source, _) in enumerate(mixture)]
    for stream in streams:
        stream.check_start()
    settings = {"kind": kind, "max_length": seq_length,
                **{k: v for k, v in options.items() if k not in RESUME_FREE_OPTIONS}}
    identity = [_identity(source, fingerprint(source, tokenizer, settings)) for source, _ in mixture]
    return StreamBatchIterator(
        streams, kind=kind, global_batch_size=global_batch_size, max_length=max_length,
        pad_id=pad_id_of(tokenizer), packing=packing, seed=seed,
        weights=[w for _, w in mixture], names=[src for src, _ in mixture],
        process_index=process_index, process_count=process_count,
        max_segments_per_row=max_segments_per_row, data=identity)


# load_examples options that may change on resume (see the module docstring): not in a source's identity.
RESUME_FREE_OPTIONS = ("skip_invalid",)
# A source's settings as the config keys that set them (for refusals naming what changed).
_SETTING_KEYS = {"kind": "the method (sft / dpo)", "max_length": "data.max_length (halved for packed DPO)",
                 "fmt": "data.format", "truncation": "data.truncation",
                 "completion_only_loss": "data.completion_only_loss", "chat_template": "data.chat_template",
                 "max_record_bytes": "data.max_record_bytes"}


def _identity(source: str, found: tuple[str, dict] | None) -> dict:
    """A source's record in the iterator state: its fingerprint and what it covers (a hub
    dataset, which has no local files, is known by its name)."""
    if found is None:
        return {"source": source, "fingerprint": source}
    fp, inputs = found
    return json.loads(json.dumps({"source": source, "fingerprint": fp, **inputs}, default=str))


def _file_entry(entry) -> tuple[str, int | None]:
    """(path, size) of one file of `cache.fingerprint`'s inputs ([path, size, ...] or a dict)."""
    if isinstance(entry, dict):
        return str(entry.get("path")), entry.get("size")
    size = entry[1] if len(entry) > 1 and isinstance(entry[1], int) else None
    return str(entry[0]), size


def _source_change(old: dict, new: dict) -> str | None:
    """How a source's identity changed, in words: files added, removed or changed (with the
    size), the tokenizer, a data setting (by its config key); None if it did not."""
    if old.get("fingerprint") == new.get("fingerprint"):
        return None
    old_files = {_file_entry(e)[0]: e for e in old.get("files", [])}
    new_files = {_file_entry(e)[0]: e for e in new.get("files", [])}
    parts = [f"file {f} removed" for f in sorted(old_files.keys() - new_files.keys())]
    parts += [f"file {f} added" for f in sorted(new_files.keys() - old_files.keys())]
    for f in sorted(old_files.keys() & new_files.keys()):
        if old_files[f] != new_files[f]:
            before, after = _file_entry(old_files[f])[1], _file_entry(new_files[f])[1]
            parts.append(f"file {f} changed ({before} -> {after} bytes)" if before != after else
                         f"file {f} changed (same size, other content)")
    if old.get("tokenizer") != new.get("tokenizer"):
        parts.append("the tokenizer changed (model.tokenizer, or model.path's tokenizer)")
    old_settings, new_settings = old.get("settings") or {}, new.get("settings") or {}
    for key in sorted(set(old_settings) | set(new_settings)):
        if key not in RESUME_FREE_OPTIONS and old_settings.get(key) != new_settings.get(key):
            parts.append(f"{_SETTING_KEYS.get(key, key)}: {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    if old.get("version") != new.get("version"):
        parts.append(f"the fingerprint's version {old.get('version')} -> {new.get('version')} (another jaxft)")
    return "; ".join(parts) or "its fingerprint changed"


def stream_from_config(config, tokenizer, *, kind: str, load_kwargs: dict) -> StreamBatchIterator:
    """This host's `StreamBatchIterator` for a run config with data.streaming=True; a config
    that needs the data's length (or all of it at once) fails naming the key to change."""
    import jax

    train = config.train
    if train.epochs > 0:
        raise ConfigError("config key train.epochs: a streaming source (data.streaming=True) has "
                         "no known length; set train.epochs=0 and the run's length with train.steps")
    if train.eval_every == -1:
        raise ConfigError("config key train.eval_every: -1 (every epoch) needs the data's length; "
                         "with data.streaming=True set a number of steps")
    if kind == "dpo" and config.dpo.reference != "none" and config.dpo.precompute_reference:
        raise ConfigError(_NO_REFERENCE_PASS)
    return make_stream_iterator(
        config.data.train, tokenizer, kind=kind, global_batch_size=train.batch_size,
        max_length=config.data.max_length, packing=config.data.packing, seed=train.seed,
        shuffle_buffer=config.data.shuffle_buffer, process_index=jax.process_index(),
        process_count=jax.process_count(), load_kwargs=load_kwargs,
        max_segments_per_row=config.data.max_segments_per_row)
