"""An ordered map over worker processes, for the first tokenisation of a source: items are
read here and sent to workers in chunks, each worker sets itself up once (its own tokenizer),
and the results come back in input order, so they equal a loop in one process.

Workers are forked where the platform can (as `datasets.map(num_proc=)` does): they start at
once and run only tokenizer code, never JAX; elsewhere they are spawned, which costs seconds
of start-up and needs the calling script's `if __name__ == "__main__":` guard. Inputs that
fit in the first few chunks are mapped here, without workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import warnings
from typing import Callable, Iterable, Iterator

CHUNK = 512  # items a worker gets at once
SERIAL_BELOW = 4 * CHUNK  # inputs smaller than this never start workers

_state = None
_work_fn: Callable | None = None


def _start(setup: Callable, setup_args: tuple, work: Callable) -> None:
    global _state, _work_fn
    _state, _work_fn = setup(*setup_args), work


def _chunk(items: list) -> list:
    return [_work_fn(_state, item) for item in items]


def default_num_proc() -> int:
    """data.num_proc = 0: every core this process may use."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ordered_map(setup: Callable, setup_args: tuple, work: Callable, items: Iterable, *, num_proc: int) -> Iterator:
    """`work(state, item)` for every item, in order, with `state = setup(*setup_args)` made once
    per worker (module-level functions: spawned workers import them by name)."""
    items = iter(items)
    head = list(itertools.islice(items, SERIAL_BELOW))
    if num_proc <= 1 or len(head) < SERIAL_BELOW:  # small: not worth starting processes
        state = setup(*setup_args)
        yield from (work(state, item) for item in itertools.chain(head, items))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with warnings.catch_warnings():
        # Python warns that JAX's threads may hold locks across the fork: the workers never
        # touch JAX, only the tokenizer.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        pool = context.Pool(num_proc, initializer=_start, initargs=(setup, setup_args, work))
    with pool:
        for results in pool.imap(_chunk, _chunks(itertools.chain(head, items))):
            yield from results


def _chunks(items) -> Iterator[list]:
    while chunk := list(itertools.islice(items, CHUNK)):
        yield chunk
