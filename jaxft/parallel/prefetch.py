"""Batches prepared ahead of the step: a background thread takes the next host batches, makes
them global arrays on the devices and queues them, so the step loop never waits for the host
between steps (Levanter's background iterable, in a few lines).

The thread reads the data iterator strictly in order, so the batches are the ones the loop
would have built itself; each carries the iterator's progress right after it, which is what
a checkpoint taken after that batch's step must record (the iterator itself has run ahead).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

from jaxft.parallel.batches import to_global


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One batch ready for the step, with the data progress it leaves behind."""
    batch: dict  # global arrays, as `to_global` makes them
    length: int  # the batch's row length L (a bucket, or max_length when packing)
    data_state: dict  # `data.get_state()` after this batch
    real_tokens: int  # `data.real_tokens` after this batch
    padding_fraction: float
    epoch: int


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


def prepare(data, mesh) -> Prepared:
    """The next batch of `data` (a `BatchIterator`), global on `mesh`. An iterator with its own
    `device_batch(host, mesh) -> (batch, row length)` says what its step takes (online DPO's
    prompts stay on the host: the step samples its pairs from them)."""
    host = next(data)
    if hasattr(data, "device_batch"):
        batch, length = data.device_batch(host, mesh)
    else:
        batch, length = to_global(host, mesh), int(host.tokens.shape[1])
    return Prepared(batch, length, data.get_state(), data.real_tokens, float(data.padding_fraction),
                    int(data.epoch))


class Prefetcher:
    """Iterates `Prepared` batches of `data`, `depth` of them made ahead in a thread (depth 0:
    made on demand, in the caller's thread). An error in the thread is raised by `next`."""

    def __init__(self, data, mesh, *, depth: int = 2):
        self._data, self._mesh, self._depth = data, mesh, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name="jaxft-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(prepare(self._data, self._mesh))
        except BaseException as err:  # handed to the consumer, raised there
            self._put(_Failed(err))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> Prepared:
        if self._thread is None:
            return prepare(self._data, self._mesh)
        item: Any = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (batches it made ahead are dropped: the checkpointed data state is
        the one of the last batch consumed)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
