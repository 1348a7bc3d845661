"""Training methods by name: `TASKS[kind].create(run_context, params)` gives the Task the run
loop drives; `TASKS[kind].build_train_step(setup)` the step plan and bench compile.

Adding a method: a file with a `Task` subclass (see `base.py`) and one line here.
"""

from jaxft.errors import ConfigError
from jaxft.tasks.base import RunContext, StepSetup, Task, TrainStep
from jaxft.tasks.dpo import DPO
from jaxft.tasks.online_dpo import OnlineDPO
from jaxft.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {
    "sft": SFT,
    "dpo": DPO,
}


def get_task(kind: str, config=None) -> type[Task]:
    """TASKS[kind], or the variant `config` asks for (dpo.online: `OnlineDPO`, the DPO step on
    pairs it samples itself)."""
    if kind not in TASKS:
        raise ConfigError(f"unknown training kind {kind!r}; choose one of {', '.join(TASKS)}")
    if kind == "dpo" and config is not None and config.dpo.online:
        return OnlineDPO
    return TASKS[kind]


__all__ = ["RunContext", "StepSetup", "TASKS", "Task", "TrainStep", "get_task"]
