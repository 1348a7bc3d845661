"""One run per workdir: WORKDIR/run.lock names the process training it.

The lock is a small JSON file {"host", "pid", "started", "pid_start"} made complete in a
private file and then hard-linked into place (`os.link` fails if the name exists, so taking
it is atomic and a reader never sees half a record). It is removed when the run ends, also
on an exception or a preemption. A lock left by a process that died (SIGKILL, a crash) on
this host is found stale (its pid is gone, or is now another process) and taken over with a
warning. A lock from another host cannot be checked from here: the run refuses, and the
message says how to remove it if that host is gone.

With several processes (jax.distributed) sharing a workdir, only process 0 takes the lock:
the others are the same run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from jaxft.errors import UserError

log = logging.getLogger("jaxft")

LOCK_NAME = "run.lock"


class WorkdirLocked(UserError, RuntimeError):
    """Another live (or uncheckable) process holds the workdir's lock (a user error: wait for it,
    or give another --workdir; a RuntimeError as before)."""


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), which
    tells a live holder from a new process that reused its pid; None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _alive(record: dict) -> bool:
    """Whether the process of a lock `record` written on this host still runs."""
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started = record.get("pid_start")
    return started is None or _pid_start(pid) in (None, started)


def _describe(record: dict) -> str:
    return f"pid {record.get('pid')} on {record.get('host')} (started {record.get('started')})"


class RunLock:
    """WORKDIR/run.lock held by this process; `release()` removes it (if it is still ours)."""

    def __init__(self, path: Path, record: dict | None):
        self.path, self.record = path, record  # record None: not taken (process > 0)

    def release(self) -> None:
        if self.record is None:
            return
        try:
            if json.loads(self.path.read_text()) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # already gone, or replaced by hand: not ours to remove
        self.record = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _link(path: Path, record: dict) -> bool:
    """Puts `record` at `path` atomically; False if a lock is already there."""
    private = path.with_name(f".{LOCK_NAME}.{record['host']}.{record['pid']}")
    private.write_text(json.dumps(record))
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create instead
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        private.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """The holder's record; None if the lock vanished meanwhile. Raises on an unreadable one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        int(record["pid"]), record["host"]
        return record
    except (ValueError, KeyError, TypeError):
        raise WorkdirLocked(f"{path} is not a jaxft lock record ({text[:80]!r}): if no run uses "
                            f"{path.parent}, remove it (rm {path}) and rerun") from None


def acquire(workdir: Path, *, process_index: int = 0) -> RunLock:
    """Takes WORKDIR/run.lock for this process (only process 0 of a multi-host run does)."""
    path = Path(workdir) / LOCK_NAME
    if process_index != 0:
        return RunLock(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid_start": _pid_start(os.getpid())}
    for _ in range(3):  # a lock that vanishes or goes stale between looks: look again
        if _link(path, ours):
            return RunLock(path, ours)
        holder = _read(path)
        if holder is None:
            continue
        if holder["host"] != ours["host"]:
            raise WorkdirLocked(
                f"{path.parent} is locked by {_describe(holder)} ({path}); this host cannot tell whether "
                f"that run is alive: if {holder['host']} no longer trains it, remove {path} and rerun")
        if _alive(holder):
            raise WorkdirLocked(
                f"{path.parent} is being trained by {_describe(holder)}; lock {path}. Wait for it to "
                f"finish (or stop it), or use another --workdir")
        _take_over(path, holder)
    raise WorkdirLocked(f"could not take {path}: other processes keep changing it; rerun")


def acquire_for_run(workdir: Path) -> RunLock:
    """`acquire` in a run of one or several processes: process 0 takes the lock and all the
    processes learn whether it could (so none of them starts a run that process 0 refused)."""
    import jax

    if jax.process_count() == 1:
        return acquire(workdir)
    import numpy as np
    from jax.experimental import multihost_utils

    refused = None
    try:
        held = acquire(workdir, process_index=jax.process_index())
    except WorkdirLocked as err:
        refused, held = err, None
    agreed = multihost_utils.process_allgather(np.array(refused is None))
    if refused is not None:
        raise refused
    if not bool(np.all(agreed)):
        held.release()
        raise WorkdirLocked(f"process 0 could not lock {Path(workdir) / LOCK_NAME}: see its error")
    return held


def _take_over(path: Path, stale: dict) -> None:
    """Moves a stale lock aside (one rename: of several processes racing for it, one wins),
    then puts back what it moved if that was not the stale record (a racer's fresh lock)."""
    aside = path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text())
    except (OSError, ValueError):
        moved = None
    if moved == stale:
        log.warning("taking over the stale lock %s of %s: that process is gone", path, _describe(stale))
    else:
        try:
            os.link(aside, path)  # not ours to remove: restore it
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
