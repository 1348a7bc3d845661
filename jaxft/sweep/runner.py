"""Running a sweep: each run in its own SWEEP_DIR/NAME, one after another on this host (every
host of a multi-host job runs the same sequence), finished runs skipped, unfinished ones
resumed exactly by `jaxft.run.run` from their checkpoints.

SWEEP_DIR/sweep.json lists the runs; SWEEP_DIR/NAME/sweep_run.json records a run's settings
and status ("running", "finished" with its wall time, or "failed" with the error). A finished
run is skipped only when its settings are the ones asked for now; other settings are an error
naming the run, never a silent reuse of another experiment's results.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from jaxft.errors import ConfigError, UserError
from jaxft.io import atomic, folders
from jaxft.sweep.spec import Run, check, resolve_references

RECORD = "sweep_run.json"


@dataclasses.dataclass
class SweepResult:
    """What happened to each run: finished now, skipped (finished before) or failed."""
    sweep_dir: Path
    finished: list[str]
    skipped: list[str]
    failed: dict[str, str]  # name -> error


def _settings(r: Run) -> dict:
    return json.loads(json.dumps({"kind": r.kind, "config": r.config,
                                  "overrides": {k: v if isinstance(v, str) else repr(v) for k, v in r.overrides.items()}}))


def _record(workdir: Path) -> dict | None:
    path = workdir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, data: dict) -> None:
    import jax

    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def command(r: Run, sweep_dir: Path) -> str:
    """The `jaxft KIND ...` command line of one run (references resolved to paths)."""
    args = ["jaxft", r.kind, "--config", r.config, "--workdir", str(Path(sweep_dir) / r.name)]
    args += [f"--config.{k}={v if isinstance(v, str) else repr(v)}"
             for k, v in resolve_references(r.overrides, sweep_dir).items()]
    return shlex.join(args)


def commands(runs: Sequence[Run], sweep_dir: str | Path) -> list[str]:
    """One command per run, in an order that runs every run after those it refers to."""
    return [command(r, Path(sweep_dir)) for r in check(runs)]


def _finished_before(r: Run, workdir: Path) -> bool:
    record = _record(workdir)
    if record is None or record.get("status") != "finished":
        return False
    if record["settings"] != _settings(r):
        raise ConfigError(
            f"sweep run {r.name!r} in {workdir} finished with other settings ({record['settings']}) than "
            f"now ({_settings(r)}): use another sweep folder, or delete {workdir} to rerun it")
    return True


def run_sweep(runs: Sequence[Run], sweep_dir: str | Path, *, only: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Runs `runs` (a run after those it refers to) into SWEEP_DIR/NAME; `only`: just these
    names. A failed run is recorded and its dependants skipped; the others still run."""
    import jaxft.config
    from jaxft.loop import Preempted
    from jaxft.run import run as train

    sweep_dir = Path(sweep_dir)
    ordered = check(runs)
    if only:
        unknown = sorted(set(only) - {r.name for r in ordered})
        if unknown:
            raise ConfigError(f"--only {', '.join(unknown)}: not runs of this sweep ({', '.join(r.name for r in ordered)})")
    configs = {}  # every run's config errors before the first run starts
    for r in ordered:
        try:
            configs[r.name] = jaxft.config.typed(jaxft.config.load(r.config, resolve_references(r.overrides, sweep_dir)))
        except (ValueError, FileNotFoundError, UserError) as err:
            raise ConfigError(f"sweep run {r.name!r}: {err}") from err
    for r in ordered:  # a run's folder that is not a run (a model, an export, data) is refused before any write
        if not only or r.name in only:
            folders.check_workdir(sweep_dir / r.name, configs[r.name])
    _write(sweep_dir / "sweep.json", {"runs": [{"name": r.name, **_settings(r)} for r in ordered]})
    result = SweepResult(sweep_dir, [], [], {})
    for i, r in enumerate(ordered, 1):
        workdir = sweep_dir / r.name
        if only and r.name not in only:
            continue
        if _finished_before(r, workdir):
            log(f"[{i}/{len(ordered)}] {r.name}: finished before, skipped")
            result.skipped.append(r.name)
            continue
        broken = [d for d in r.depends_on() if d in result.failed]
        if broken:
            result.failed[r.name] = f"not run: it starts from {', '.join(broken)}, which failed"
            log(f"[{i}/{len(ordered)}] {r.name}: {result.failed[r.name]}")
            continue
        log(f"[{i}/{len(ordered)}] {r.name}: {command(r, sweep_dir)}")
        record = {"name": r.name, "settings": _settings(r), "status": "running"}
        start = time.perf_counter()
        try:
            _write(workdir / RECORD, record)
            train(configs[r.name], workdir, kind=r.kind)
        except Preempted:
            raise  # the job is being stopped: the launcher reruns the sweep, which resumes here
        except Exception as err:  # noqa: BLE001 - recorded, reported, and the sweep goes on
            result.failed[r.name] = f"{type(err).__name__}: {err}"
            _write(workdir / RECORD, {**record, "status": "failed", "error": result.failed[r.name]})
            if not isinstance(err, UserError):  # a bug or an outside failure: where it happened
                log("".join(traceback.format_exception(err)).rstrip())
            log(f"[{i}/{len(ordered)}] {r.name}: FAILED: {result.failed[r.name]}")
            continue
        # Wall time of the invocation that finished it (a resumed run: since it resumed).
        _write(workdir / RECORD, {**record, "status": "finished", "wall_s": round(time.perf_counter() - start, 1)})
        result.finished.append(r.name)
    return result
