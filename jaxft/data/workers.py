"""An ordered map over worker processes, for the first tokenisation of a source: items are
read here and sent to workers in chunks, each worker sets itself up once (its own tokenizer),
and the results come back in input order, so they equal a loop in one process.

Workers are spawned, never forked: the parent runs JAX (and, multi-host, its coordination
threads), and a forked child can deadlock on a lock one of them held (seen with two
jax.distributed processes on Python 3.12). Spawning costs a few seconds of start-up, so inputs
under SERIAL_BELOW items are mapped here, without workers; and, as with any spawn, a calling
script needs its `if __name__ == "__main__":` guard (the jaxft CLI and notebooks need none).
"""

from __future__ import annotations

import itertools
import multiprocessing
from typing import Callable, Iterable, Iterator

CHUNK = 512  # items a worker gets at once
SERIAL_BELOW = 40 * CHUNK  # ~20k: inputs smaller than this never start workers

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
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_start, initargs=(setup, setup_args, work)) as pool:
        for results in pool.imap(_chunk, _chunks(itertools.chain(head, items))):
            yield from results


def _chunks(items) -> Iterator[list]:
    while chunk := list(itertools.islice(items, CHUNK)):
        yield chunk
