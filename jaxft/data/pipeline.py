"""Examples -> fixed-shape batches: shuffle, mix, pack or bucket, shard per host, resume.

The global batch stream is a pure function of (data, settings, seed), computed identically on
every host; each host materialises only its contiguous slice of the global rows.

How a step's examples are chosen (see `mixture.DrawStream` for the draws):
* The draw stream is cut into *chunks*: `pack_chunk` draws when packing, else
  `window_batches * global_batch_size` draws. With one dataset, chunks never cross an epoch
  boundary, so an epoch's examples are laid out among themselves.
* A chunk becomes an ordered list of global *units*: packed rows (best-fit decreasing, then
  shuffled) or, unpacked, examples / pairs sorted by length in groups of the batch size whose
  order is shuffled (so a batch holds similar lengths and its bucket wastes little).
* A global batch is the next `global_batch_size` units; packed batches may span chunks. With
  one dataset a batch never spans epochs: the last batch of an epoch is filled with empty
  rows (all masks 0), so every example is used exactly once per epoch. Mixtures have no
  epoch of their own and are never padded this way.

Unpacked batches are padded to the smallest bucket (`packing.bucket_lengths`) that fits the
longest sequence of the *global* batch, so all hosts agree on the shape. Example / pair keys
(`example_index`, `pair_index`) are `example.index` plus an offset per source of a mixture
(`BatchIterator.index_offsets`) so they stay unique. DPO pair arrays (`chosen_row`, `pair_index`, ...)
describe the whole global batch on every host, with global row numbers (`BatchLayout.build`).

Iterator state (`get_state`): {"version", "position" (draws before the current chunk),
"counts" (per-source draws before it), "row" (units of the current chunk already used),
"batches", "real_tokens", "slot_tokens" (padding statistics), "settings" (batch settings),
"data" ({"sources": [{"source", "num_examples", "hash"}]}: each source's example count and a
hash of its examples' tokens, so a refused resume names the source that changed), "fingerprint"
(hash of settings and data, e.g. to key caches)}. All small ints/strings: JSON-safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxft.data.batch import DPOBatch, PreferenceExample, SFTBatch, SFTExample
from jaxft.data.iterator_state import STATE_VERSION, check_state, data_changes, data_hash, examples_change, source_hash
from jaxft.data.mixture import DrawStream, parse_mixture, seeded_rng
from jaxft.data.packing import (
    DEFAULT_MAX_SEGMENTS, BatchLayout, check_lengths, group_by_length, pack_lengths,
    row_lengths, unit_lengths)
from jaxft.data.progress import BatchProgress
from jaxft.errors import ConfigError, DataError

Example = SFTExample | PreferenceExample
Batch = SFTBatch | DPOBatch
_TAG_ROWS = 0x726F7773


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked, so any id works)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the tokenizer has neither a pad nor an EOS token id")


@dataclasses.dataclass(frozen=True)
class _Chunk:
    datasets: np.ndarray  # [n] source of each draw
    examples: np.ndarray  # [n] position of each draw's example in its source
    units: list[list[int]]  # global units in order, each listing draws of this chunk
    period_end: bool  # the last chunk of an epoch (single source): pad the batch after it
    next_position: int
    next_counts: list[int]


def _check_setup(datasets, kind, global_batch_size, process_index, process_count, names,
                 field="train.batch_size"):
    if kind not in ("sft", "dpo"):
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
    want = SFTExample if kind == "sft" else PreferenceExample
    for name, examples in zip(names, datasets):
        if not examples:
            raise DataError(f"source {name!r} has no examples")
        if not isinstance(examples[0], want):
            raise ValueError(f"source {name!r} holds {type(examples[0]).__name__}, but "
                             f"kind={kind!r} needs {want.__name__}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"{field} ({global_batch_size}) must be a positive multiple of the number "
            f"of processes ({process_count}): each host loads an equal slice of the batch")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def check_max_segments(kind: str, max_segments_per_row: int) -> None:
    """ValueError naming data.max_segments_per_row unless a packed row of `kind` can hold one
    unit: an SFT example is one segment, a DPO pair two (chosen and rejected)."""
    need = 2 if kind == "dpo" else 1
    if max_segments_per_row < need:
        what = "a packed DPO pair is two segments (chosen and rejected)" if kind == "dpo" else \
            "a packed SFT example is one segment"
        raise ConfigError(f"config key data.max_segments_per_row: must be >= {need} with data.packing=True "
                         f"({what}), got {max_segments_per_row}")


def _keys(datasets) -> tuple[list[np.ndarray], list[int]]:
    """Per source: key of each example (index + offset), and the offsets themselves."""
    keys, offsets, offset = [], [], 0
    for examples in datasets:
        idx = np.array([e.index if e.index >= 0 else i for i, e in enumerate(examples)])
        keys.append(idx + offset)
        offsets.append(offset)
        offset += int(idx.max()) + 1
    return keys, offsets


class BatchIterator(BatchProgress):
    """Infinite, deterministic, resumable stream of one host's fixed-shape batches.

    datasets: one list of examples per source (all SFTExample for kind "sft", all
    PreferenceExample for "dpo"); weights: mixture weights (default equal; ignored for one
    source). global_batch_size counts examples (SFT), pairs (DPO) or, with packing, packed rows.
    Each `next()` gives this host's SFTBatch [B/H, L] or DPOBatch ([2P/H, L] rows unpacked),
    with L = max_length when packing, else a bucket length.
    """

    def __init__(self, datasets: Sequence[Sequence[Example]], *, kind: str,
                 global_batch_size: int, max_length: int, pad_id: int, packing: bool = False,
                 seed: int = 0, weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, reports: dict | None = None,
                 process_index: int = 0, process_count: int = 1,
                 max_segments_per_row: int = DEFAULT_MAX_SEGMENTS,
                 window_batches: int = 32, pack_chunk: int = 8192):
        self.names = list(names or [f"source{d}" for d in range(len(datasets))])
        _check_setup(datasets, kind, global_batch_size, process_index, process_count, self.names)
        self.datasets = [list(d) for d in datasets]
        self.reports = dict(reports or {})
        weights = [1.0] * len(datasets) if weights is None else list(weights)
        self._stream = DrawStream([len(d) for d in datasets], weights, seed)
        self._batch = global_batch_size
        self._per_row = max_segments_per_row // (2 if kind == "dpo" else 1)
        self._chunk_size = pack_chunk if packing else window_batches * global_batch_size
        self._start_progress(BatchLayout(kind, packing, max_length, pad_id, max_segments_per_row,
                                         process_index, process_count), max_segments_per_row)
        # Packing needs a unit's total tokens; bucketing the longest row it occupies.
        self._lengths = [(unit_lengths if packing else row_lengths)(d) for d in self.datasets]
        for name, examples, lengths in zip(self.names, self.datasets, self._lengths):
            if lengths.max() > max_length:  # tokenize truncates or drops these: a bug upstream
                i = int(np.argmax(lengths))
                raise ValueError(
                    f"source {name!r} example {examples[i].index} needs {lengths[i]} tokens, "
                    f"more than max_length {max_length}" +
                    (" (a packed DPO pair holds chosen + rejected)" if packing else ""))
        if packing:
            check_max_segments(kind, max_segments_per_row)
        self._keys, self.index_offsets = _keys(self.datasets)
        self._settings = json.loads(json.dumps({
            "kind": kind, "global_batch_size": global_batch_size, "max_length": max_length,
            "packing": packing, "seed": seed, "weights": self._stream.weights.tolist(),
            "max_segments_per_row": max_segments_per_row, "window_batches": window_batches,
            "pack_chunk": pack_chunk}))
        self._given = list(datasets)  # as given: a cache's flat arrays hash without a copy
        self._data = {"sources": [{"source": name, "num_examples": len(d), "hash": source_hash(d)}
                                  for name, d in zip(self.names, self._given)]}
        self._fingerprint = hashlib.blake2b(
            json.dumps([self._settings, self._data], sort_keys=True).encode(),
            digest_size=12).hexdigest()
        self._position, self._counts, self._row = 0, [0] * len(datasets), 0
        self._chunks: dict[int, _Chunk] = {}

    # -- the stream ------------------------------------------------------------------------

    def _chunk(self, position: int, counts: list[int]) -> _Chunk:
        if position in self._chunks:
            return self._chunks[position]
        count, period_end = self._chunk_size, False
        if len(self.datasets) == 1:  # chunks stop at epoch ends
            size = len(self.datasets[0])
            epoch_end = (position // size + 1) * size
            count = min(count, epoch_end - position)
            period_end = position + count == epoch_end
        datasets, examples, after = self._stream.take(position, counts, count)
        lengths = np.empty(count, np.int64)
        for d, source_lengths in enumerate(self._lengths):
            sel = datasets == d
            lengths[sel] = source_lengths[examples[sel]]
        rng = seeded_rng(self._stream.seed, _TAG_ROWS, position)
        if self._layout.packing:
            rows = pack_lengths(lengths, self._layout.max_length, self._per_row)
            units = [rows[i] for i in rng.permutation(len(rows))]
        else:
            order = group_by_length(lengths, self._batch, rng)
            units = [[u] for u in order.tolist()]
        chunk = _Chunk(datasets, examples, units, period_end, position + count, after)
        if len(self._chunks) >= 2:  # keep the current chunk and the one a batch spills into
            self._chunks.pop(min(self._chunks))
        self._chunks[position] = chunk
        return chunk

    def _next_units(self) -> list[list[tuple[Example, int]]]:
        units: list[list[tuple[Example, int]]] = []
        while len(units) < self._batch:
            chunk = self._chunk(self._position, self._counts)
            take = min(self._batch - len(units), len(chunk.units) - self._row)
            for unit in chunk.units[self._row:self._row + take]:
                units.append([self._example(int(chunk.datasets[u]), int(chunk.examples[u]))
                              for u in unit])
            self._row += take
            if self._row == len(chunk.units):
                self._position, self._counts, self._row = (
                    chunk.next_position, chunk.next_counts, 0)
                if chunk.period_end:
                    break
        return units + [[] for _ in range(self._batch - len(units))]

    def _example(self, d: int, i: int) -> tuple[Example, int]:
        return self.datasets[d][i], int(self._keys[d][i])

    # -- progress (tokens, padding, epoch: `BatchProgress`) ---------------------------------

    @property
    def dataset_epochs(self) -> dict[str, int]:
        """Completed passes over each source (as of the chunk being consumed)."""
        return {name: c // len(d) for name, c, d in zip(self.names, self._counts, self.datasets)}

    @property
    def num_examples(self) -> int:
        return sum(len(d) for d in self.datasets)

    def one_pass(self, batch_size: int) -> "EvalBatches":
        """Every training example once, in order, as `EvalBatches` of `batch_size` with the
        keys (`pair_index`, `example_index`) training gives them: a pass over the loaded data
        (e.g. DPO's reference log-probs) without reading or tokenising it again."""
        layout = self._layout
        return EvalBatches(
            [e for d in self.datasets for e in d], kind=layout.kind, batch_size=batch_size,
            max_length=layout.max_length, pad_id=layout.pad_id, packing=layout.packing,
            process_index=layout.process_index, process_count=layout.process_count,
            max_segments_per_row=layout.max_segments, keys=[int(k) for ks in self._keys for k in ks],
            reports=self.reports)

    def batches_per_epoch(self) -> int:
        """Global batches in one pass over the data: exact for one source (epoch 0), for a
        mixture an estimate from its first chunk (packing) or the example count."""
        if len(self.datasets) == 1:
            position, counts, units = 0, [0], 0
            while position < len(self.datasets[0]):
                chunk = self._chunk(position, counts)
                units += len(chunk.units)
                position, counts = chunk.next_position, chunk.next_counts
            return -(-units // self._batch)
        chunk = self._chunk(0, [0] * len(self.datasets))
        per_unit = len(chunk.examples) / len(chunk.units)
        return int(np.ceil(self.num_examples / per_unit / self._batch))

    # -- state -----------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; `set_state` on it continues with exactly the next batch."""
        return {"version": STATE_VERSION, "position": self._position,
                "counts": list(self._counts), "row": self._row, **self._progress_state(),
                "settings": dict(self._settings), "data": dict(self._data),
                "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore `get_state()` output; ValueError if the data or batch settings changed,
        naming each source that changed and how (its example count, or its tokens)."""
        check_state(state, streaming=False, settings=self._settings)
        saved = state["data"]
        if "sources" in saved:
            changed = data_changes(saved["sources"], self._data["sources"], examples_change)
        else:  # a checkpoint of jaxft before per-source hashes: one hash of every source
            counts = [s["num_examples"] for s in self._data["sources"]]
            changed = ([f"examples per source {saved['num_examples']} -> {counts}"]
                       if saved["num_examples"] != counts else
                       ["the same examples per source, other tokens"]
                       if saved["hash"] != data_hash(self._given) else [])
        if changed:
            raise DataError(
                "cannot resume the data iterator: the training data changed since the checkpoint ("
                + "; ".join(changed) + "). Resume with the original data or start a new workdir.")
        self._position, self._counts = int(state["position"]), [int(c) for c in state["counts"]]
        self._row = int(state["row"])
        self._set_progress_state(state)


class EvalBatches:
    """One deterministic pass over eval examples, in order, each exactly once; the last batch
    is filled with empty rows (all masks 0) so every batch has the same rows. Re-iterable.

    batch_size counts examples / pairs / packed rows as for training. Packed: BFD over the
    whole set (rows in packing order); unpacked: consecutive examples, each batch padded to
    its bucket.
    """

    def __init__(self, examples: Sequence[Example], *, kind: str, batch_size: int,
                 max_length: int, pad_id: int, packing: bool = False, process_index: int = 0,
                 process_count: int = 1,
                 max_segments_per_row: int = DEFAULT_MAX_SEGMENTS,
                 keys: Sequence[int] | None = None, reports: dict | None = None):
        _check_setup([examples], kind, batch_size, process_index, process_count, ["eval"],
                     field="data.eval_batch_size")
        self.examples = list(examples)
        self.reports = dict(reports or {})
        self._keys = list(keys) if keys is not None else [e.index for e in self.examples]
        self._batch = batch_size
        self._layout = BatchLayout(kind, packing, max_length, pad_id, max_segments_per_row,
                                   process_index, process_count)
        if packing:
            check_max_segments(kind, max_segments_per_row)
            per_row = max_segments_per_row // (2 if kind == "dpo" else 1)
            self._units = pack_lengths(unit_lengths(self.examples), max_length, per_row)
        else:
            check_lengths(row_lengths(self.examples), max_length)
            self._units = [[i] for i in range(len(self.examples))]

    def __len__(self) -> int:
        return -(-len(self._units) // self._batch)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self._units), self._batch):
            units = [[(self.examples[i], self._keys[i]) for i in unit]
                     for unit in self._units[start:start + self._batch]]
            units += [[] for _ in range(self._batch - len(units))]
            yield self._layout.build(units)[0]


def _load(spec: str, tokenizer, *, kind, max_length, packing, load_kwargs, field):
    from jaxft.data.tokenize import load_examples  # lazy: the tokenizer stack is heavy

    # A packed DPO pair shares one row, so each sequence gets at most half of it.
    seq_length = max_length // 2 if kind == "dpo" and packing else max_length
    # Eval uses every source whole, so a plain comma list is fine there.
    mixture = parse_mixture(spec, field, require_weights=field == "data.train")
    sets = [load_examples(source, tokenizer, kind=kind, max_length=seq_length,
                          **(load_kwargs or {})) for source, _ in mixture]
    return mixture, sets


def make_train_iterator(sources: str, tokenizer, *, kind: str, global_batch_size: int,
                        max_length: int, packing: bool, seed: int, process_index: int = 0,
                        process_count: int = 1, load_kwargs: dict | None = None,
                        max_segments_per_row: int = DEFAULT_MAX_SEGMENTS
                        ) -> BatchIterator:
    """Load `sources` (a `data.train` mixture spec) with `load_examples(**load_kwargs)` and
    return the training BatchIterator. With DPO packing each sequence is truncated to
    max_length // 2 so that a pair fits one row. `.reports` maps source -> DataReport."""
    mixture, sets = _load(sources, tokenizer, kind=kind, max_length=max_length,
                          packing=packing, load_kwargs=load_kwargs, field="data.train")
    return BatchIterator(
        [s.examples for s in sets], kind=kind, global_batch_size=global_batch_size,
        max_length=max_length, pad_id=pad_id_of(tokenizer), packing=packing, seed=seed,
        weights=[w for _, w in mixture], names=[src for src, _ in mixture],
        reports={src: s.report for (src, _), s in zip(mixture, sets)},
        process_index=process_index, process_count=process_count,
        max_segments_per_row=max_segments_per_row)


def make_eval_batches(source: str, tokenizer, *, kind: str, batch_size: int, max_length: int,
                      packing: bool, process_index: int = 0, process_count: int = 1,
                      load_kwargs: dict | None = None,
                      max_segments_per_row: int = DEFAULT_MAX_SEGMENTS) -> EvalBatches:
    """Load `source` (one source or a comma list; weights are ignored: eval uses everything)
    and return its EvalBatches. Keys are offset per source as in training."""
    mixture, sets = _load(source, tokenizer, kind=kind, max_length=max_length,
                          packing=packing, load_kwargs=load_kwargs, field="data.eval")
    keys, _ = _keys([s.examples for s in sets])
    return EvalBatches(
        [e for s in sets for e in s.examples], kind=kind, batch_size=batch_size,
        max_length=max_length, pad_id=pad_id_of(tokenizer), packing=packing,
        process_index=process_index, process_count=process_count,
        max_segments_per_row=max_segments_per_row,
        keys=[int(k) for ks in keys for k in ks],
        reports={src: s.report for (src, _), s in zip(mixture, sets)})
