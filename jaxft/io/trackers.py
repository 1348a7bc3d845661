"""Experiment trackers by name (`train.report_to`): where metrics go besides metrics.jsonl.

`TRACKERS` maps a name to a class with one small interface (`Tracker`): the run's config at
the start, scalars and sample generations per step, the final metrics at the end. The
`MetricsWriter` (`jaxft.io.metrics`) opens the ones a run asks for, on process 0 only.

W&B is an optional extra (`pip install 'jaxft[wandb]'`): `wandb` is imported only inside
`WandB`, so a run that does not report to it never imports it. Offline mode is W&B's own:
`WANDB_MODE=offline` writes the run to WORKDIR/wandb/offline-run-* (`wandb sync` uploads it).
This module imports no jax: the config checks it at start-up.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import uuid
from pathlib import Path

from jaxft.config.schema import typed
from jaxft.errors import ConfigError
from jaxft.io import atomic

WANDB_ID_FILE = "wandb_id"  # WORKDIR/wandb_id: a resumed run continues the same W&B run


class Tracker(abc.ABC):
    """One experiment tracker, built as `cls(workdir, config)`: that starts its run for the
    workdir and logs `config` (the run's config as a plain dict). Scalars are finite floats;
    sample rows are {"prompt": str, "completion": str}."""

    module: str | None = None  # the optional package this tracker needs (checked at start-up)

    @abc.abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        ...

    @abc.abstractmethod
    def log_samples(self, step: int, rows: list[dict]) -> None:
        ...

    @abc.abstractmethod
    def log_config(self, config: dict) -> None:
        ...

    @abc.abstractmethod
    def finish(self, final_metrics: dict[str, float] | None) -> None:
        """Ends the tracker's run; `final_metrics` (None when the run was interrupted) go to
        its summary."""


class TensorBoard(Tracker):
    """WORKDIR/tensorboard: scalars, samples and the config as text (tensorboardX)."""

    def __init__(self, workdir, config):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        self.log_config(config)

    def log(self, step, scalars):
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def log_samples(self, step, rows):
        # TensorBoard renders text as Markdown: a blank-line separated block per sample.
        text = "\n\n---\n\n".join(f"**prompt:** {r['prompt']}\n\n**completion:** {r['completion']}"
                                  for r in rows)
        self._tb.add_text("samples", text, step)
        self._tb.flush()

    def log_config(self, config):
        self._tb.add_text("config", _code_block(json.dumps(config, indent=2, sort_keys=True, default=str)))

    def finish(self, final_metrics):
        if final_metrics:
            self._tb.add_text("final_metrics", _code_block(json.dumps(final_metrics, indent=2, sort_keys=True)))
        self._tb.close()


class WandB(Tracker):
    """A W&B run named after the workdir, in `train.wandb_project`, its files under
    WORKDIR/wandb. The run id is kept in WORKDIR/wandb_id so that resuming the workdir
    resumes the W&B run. Metrics are plotted against a "step" metric rather than W&B's own
    step counter, so the steps a resumed run redoes are not dropped as non-monotonic."""

    module = "wandb"

    def __init__(self, workdir, config):
        import wandb

        workdir = Path(workdir)
        id_file = workdir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
            atomic.write_text(id_file, run_id + "\n")
        self._wandb = wandb
        project = typed(config).train.wandb_project or "jaxft"  # {} without a run config: the default
        self._run = wandb.init(project=project,
                               name=workdir.name, dir=str(workdir), id=run_id, resume="allow")
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        self.log_config(config)

    def log(self, step, scalars):
        self._run.log({**scalars, "step": step})

    def log_samples(self, step, rows):
        table = self._wandb.Table(columns=["step", "prompt", "completion"],
                                  data=[[step, r["prompt"], r["completion"]] for r in rows])
        self._run.log({"samples": table, "step": step})

    def log_config(self, config):
        # A resumed run may change keys that allow it (train.steps): not an error.
        self._run.config.update(config, allow_val_change=True)

    def finish(self, final_metrics):
        if final_metrics:
            self._run.summary.update(final_metrics)
        self._run.finish(exit_code=0 if final_metrics is not None else 1)


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
}
NONE = "none"  # metrics.jsonl only


def parse_report_to(value: str) -> list[str]:
    """The tracker names of `train.report_to` ("tensorboard", "tensorboard,wandb", "none"),
    checked: unknown names and trackers whose package is missing fail here, naming the key."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    allowed = f"{', '.join(TRACKERS)} or {NONE} (a comma list allowed, e.g. 'tensorboard,wandb')"
    unknown = [n for n in names if n not in TRACKERS and n != NONE]
    if unknown or not names:
        raise ConfigError(f"config key train.report_to: unknown tracker {', '.join(map(repr, unknown)) or repr(value)}; "
                         f"choose from {allowed}")
    if NONE in names:
        if len(names) > 1:
            raise ConfigError(f"config key train.report_to: {value!r}: '{NONE}' cannot be combined with a tracker")
        return []
    for name in names:
        module = TRACKERS[name].module
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key train.report_to: {name!r} needs the {module} package: "
                             f"pip install {module} (or pip install 'jaxft[{name}]')")
    return list(dict.fromkeys(names))  # in order, each once


def open_trackers(report_to: str, workdir: str | Path, config: dict) -> list[Tracker]:
    """The trackers `report_to` names, started for the run in `workdir`."""
    return [TRACKERS[name](Path(workdir), config) for name in parse_report_to(report_to)]


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: keep it verbatim
