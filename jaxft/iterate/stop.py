"""SIGTERM (preemption) and Ctrl-C while `jaxft iterate` samples, scores, evaluates or exports.

A round's training has its own handler (`jaxft.loop.StopFlag`, installed by `jaxft.run` around its
step loop): it saves at the next step boundary and raises `Preempted` (exit 75) / `Interrupted`
(exit 130). Everywhere else iterate's work is a pass that writes its result at the end (an
evaluation, an export, a chunk of samples), so `Stopper` stops it at once: the handler raises
where the signal lands, except inside `deferred()` sections (the append of a chunk of samples
to samples.partial.jsonl), which finish first. What was written stays; the rerun of the same
command continues from it. A signal that a round's run took but did not stop for (one in its
last step: the run finishes and exports) stops iterate when the run returns (`Stopper.watching`). The stop surfaces as `StageStopped` (a `Preempted`: exit 75) or
`StageInterrupted` (an `Interrupted`: exit 130), saying where iterate was. A second SIGTERM is
ignored (the stop is under way); a second Ctrl-C raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from jaxft.loop.stop import Interrupted, Preempted

log = logging.getLogger("jaxft")


class StageStopped(Preempted):
    """iterate stopped by SIGTERM outside a round's step loop (exit 75)."""

    def __init__(self, where: str):
        Exception.__init__(self, f"{self.cause} while {where}; rerun the same command to resume")
        self.step = None
        self.where = where


class StageInterrupted(StageStopped, Interrupted):
    """iterate stopped by Ctrl-C outside a round's step loop (exit 130)."""


class _Abort(BaseException):
    """Raised by the handler where the signal lands (a BaseException: no `except Exception` on
    the way swallows it); `Stopper.installed` turns it into StageStopped / StageInterrupted."""


class Stopper:
    """iterate's SIGTERM / SIGINT handler for its whole call; `where` names the stage for the
    message (updated as the stages and sample chunks go)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None  # the first stop signal received
        self.where = "starting"
        self._deferred = 0
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:  # a stop is under way
            if signum == signal.SIGINT:
                log.warning("second Ctrl-C: stopping now")
                raise KeyboardInterrupt
            return
        self.signum = signum
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s received while %s: stopping%s", name, self.where,
                    " after this write" if self._deferred else "")
        if not self._deferred:
            raise _Abort

    def check(self) -> None:
        """Stops here if a signal came and its raise was lost (landed where a library swallowed
        it, e.g. a callback from C)."""
        if self.signum is not None and not self._deferred:
            raise _Abort

    @contextlib.contextmanager
    def deferred(self):
        """A section a signal does not cut: the stop happens at its end."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        self.check()

    @contextlib.contextmanager
    def watching(self, where_after: str):
        """A block where another handler may take the signals (a round's run): a SIGTERM /
        SIGINT that came during it (seen through `signal.set_wakeup_fd`, whoever handled it)
        and did not end it with an exception stops iterate when it returns, `where_after`
        naming the moment."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no handlers either
            os.close(read_fd)
            os.close(write_fd)
            yield
            return
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)
            try:
                received = os.read(read_fd, 4096)
            except BlockingIOError:
                received = b""
            os.close(read_fd)
            os.close(write_fd)
        came = [s for s in received if s in self.SIGNALS]
        if came and self.signum is None:
            self.signum, self.where = came[0], where_after
            log.warning("%s came during %s: stopping", signal.Signals(came[0]).name, where_after)
            raise _Abort

    def error(self) -> StageStopped:
        return (StageInterrupted if self.signum == signal.SIGINT else StageStopped)(self.where)

    @contextlib.contextmanager
    def installed(self):
        """The handler for the block (not in a non-main thread: there is none then); a stop
        leaves the block as StageStopped / StageInterrupted."""
        try:
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        try:
            yield self
        except _Abort:
            raise self.error() from None
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}


def deferred(stop: Stopper | None):
    """`stop.deferred()`, or nothing without a Stopper."""
    return stop.deferred() if stop is not None else contextlib.nullcontext()
