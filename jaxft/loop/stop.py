"""Stopping a run on a signal: SIGTERM (preemption) or Ctrl-C (SIGINT), at a step boundary.

`StopFlag` is installed by `jaxft.run` for the run's duration; the loop's `Preemption` hook
(`jaxft.loop.hooks`) reads it. SIGTERM makes the run save at the next step boundary, wait for
the write, and raise `Preempted` (the CLI exits with EXIT_PREEMPTED = 75, "try again": rerun
the same command to resume). Ctrl-C does the same and raises `Interrupted` (exit
EXIT_INTERRUPTED = 130, the shell's code for Ctrl-C); a second Ctrl-C raises
KeyboardInterrupt at once, without saving (the last committed checkpoint stays the latest).
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np

log = logging.getLogger("jaxft")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run saved and stopped; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (saved, or not on a second Ctrl-C)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint has been written."""

    exit_code = EXIT_PREEMPTED
    cause = "preempted"

    def __init__(self, step: int):
        super().__init__(f"{self.cause}: saved step {step}; rerun the same command to resume")
        self.step = step


class Interrupted(Preempted):
    """Raised after a Ctrl-C-triggered (SIGINT) checkpoint has been written."""

    exit_code = EXIT_INTERRUPTED
    cause = "interrupted (Ctrl-C)"


def _not_a_ctrl_c(record: logging.LogRecord) -> bool:
    """A logging filter: drops a library's error report of the KeyboardInterrupt the user asked
    for (Orbax logs the traceback of a wait it interrupts before re-raising it)."""
    kind = record.exc_info[0] if record.exc_info else None
    return not (kind is not None and issubclass(kind, KeyboardInterrupt))


class StopFlag:
    """Set by SIGTERM or a first SIGINT; checked at step boundaries. A second SIGINT raises
    KeyboardInterrupt at once (the user does not want to wait for the save)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the stop came from Ctrl-C
        self._previous = {}

    def install(self):
        def handler(signum, frame):
            if signum == signal.SIGINT and self.requested:
                log.warning("second Ctrl-C: stopping now, without saving")
                raise KeyboardInterrupt
            name = signal.Signals(signum).name
            if signum == signal.SIGINT:
                self.interrupted = True
                name = "Ctrl-C (SIGINT)"
            log.warning("%s received: saving at the next step boundary (Ctrl-C again: stop without saving)", name)
            self.requested = True

        try:
            self._previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = {}
        logging.getLogger("absl").addFilter(_not_a_ctrl_c)  # Orbax logs through absl

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        logging.getLogger("absl").removeFilter(_not_a_ctrl_c)

    def stopped(self, step: int) -> Preempted:
        """The exception that ends the run after the stop's checkpoint of `step` is written."""
        return Interrupted(step) if self.interrupted else Preempted(step)

    def due(self, step: int, every: int) -> bool:
        """Whether to check at `step`: at once on one host (a local flag costs nothing); with
        several, every `every` steps (all hosts agree on where, and the check is a gather)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(every) and step % every == 0

    def any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())
