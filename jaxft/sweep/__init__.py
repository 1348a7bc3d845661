"""Config-driven ablations: `jaxft sweep` runs a grid or a list of runs, `jaxft compare` lays
them side by side (jaxft.sweep.spec / runner / compare)."""

from jaxft.sweep.compare import Comparison, compare
from jaxft.sweep.runner import SweepResult, commands, run_sweep
from jaxft.sweep.spec import Run, grid, load_sweep_file, parse_axis, run

__all__ = ["Comparison", "Run", "SweepResult", "commands", "compare", "grid", "load_sweep_file", "parse_axis",
           "run", "run_sweep"]
