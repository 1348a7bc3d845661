"""The step loop (`train_loop`, `jaxft.loop.core`), its periodic work as hooks
(`jaxft.loop.hooks`: log, eval, sample, save, keep-best, preemption) and the signal stop
(`jaxft.loop.stop`)."""

from jaxft.loop.core import NonFiniteError, non_finite_message, train_loop
from jaxft.loop.hooks import Hook, Hooks, StepInfo
from jaxft.loop.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED, Interrupted, Preempted, StopFlag

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "Hook", "Hooks", "Interrupted", "NonFiniteError", "Preempted",
           "StepInfo", "StopFlag", "non_finite_message", "train_loop"]
