"""Tokenising a source in several processes: records are read here and sent to workers in
chunks, each worker holds its own `Encoder`, and the results come back in source order, so
the examples (and the report) equal what one process makes.

Workers are forked where the platform can (as `datasets.map(num_proc=)` does): they start at
once and run only tokenizer code, never JAX; elsewhere they are spawned, which costs seconds
of start-up and needs the calling script's `if __name__ == "__main__":` guard. Sources that
fit in the first few chunks are tokenised here, without workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import warnings
from typing import Iterable, Iterator

CHUNK = 512  # records a worker gets at once
SERIAL_BELOW = 4 * CHUNK  # sources smaller than this never start workers

_encoder = None
_options: dict = {}


def _start(tokenizer, chat_template, options) -> None:
    global _encoder, _options
    from jaxft.data.tokenize import Encoder

    _encoder, _options = Encoder(tokenizer, chat_template), options


def _work(chunk: list[tuple[int, str, object]]) -> list:
    from jaxft.data.formats import DataError
    from jaxft.data.tokenize import process_record

    out = []
    for index, location, raw in chunk:
        try:
            out.append(process_record(_encoder, raw, index, location, **_options))
        except DataError as err:
            out.append(err)
    return out


def default_num_proc() -> int:
    """data.num_proc = 0: every core this process may use."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_records_in_parallel(tokenizer, chat_template, records: Iterable[tuple[str, object]], *,
                                num_proc: int, **options) -> Iterator:
    """`tokenize.process_records` over `num_proc` worker processes, in order."""
    from jaxft.data.tokenize import Encoder, process_records

    numbered = ((i, location, raw) for i, (location, raw) in enumerate(records))
    head = list(itertools.islice(numbered, SERIAL_BELOW))
    if len(head) < SERIAL_BELOW:  # small: not worth starting processes
        yield from process_records(Encoder(tokenizer, chat_template), ((loc, raw) for _, loc, raw in head),
                                   **options)
        return
    chunks = _chunks(itertools.chain(head, numbered))
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with warnings.catch_warnings():
        # Python warns that JAX's threads may hold locks across the fork: the workers never
        # touch JAX, only the tokenizer.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        pool = context.Pool(num_proc, initializer=_start, initargs=(tokenizer, chat_template, options))
    with pool:
        for results in pool.imap(_work, chunks):
            yield from results


def _chunks(numbered) -> Iterator[list]:
    while chunk := list(itertools.islice(numbered, CHUNK)):
        yield chunk
