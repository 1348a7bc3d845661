"""Training methods by name: `TASKS[kind].create(run_context, params)` gives the Task the run
loop drives; `TASKS[kind].build_train_step(setup)` the step plan and bench compile.

Adding a method: a file with a `Task` subclass (see `base.py`) and one line here.
"""

from jaxft.errors import ConfigError
from jaxft.tasks.base import RunContext, StepSetup, Task, TrainStep
from jaxft.tasks.dpo import DPO
from jaxft.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {
    "sft": SFT,
    "dpo": DPO,
}


def get_task(kind: str) -> type[Task]:
    if kind not in TASKS:
        raise ConfigError(f"unknown training kind {kind!r}; choose one of {', '.join(TASKS)}")
    return TASKS[kind]


__all__ = ["RunContext", "StepSetup", "TASKS", "Task", "TrainStep", "get_task"]
