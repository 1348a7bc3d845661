"""Training methods by name: `TASKS[kind](run_context)` gives the Task the run loop drives.

Adding a method: a file with a `Task` subclass (see `base.py`) and one line here.
"""

from jaxft.tasks.base import RunContext, Task
from jaxft.tasks.dpo import DPO
from jaxft.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {
    "sft": SFT,
    "dpo": DPO,
}


def get_task(kind: str) -> type[Task]:
    if kind not in TASKS:
        raise ValueError(f"unknown training kind {kind!r}; choose one of {', '.join(TASKS)}")
    return TASKS[kind]


__all__ = ["RunContext", "TASKS", "Task", "get_task"]
