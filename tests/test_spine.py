"""One spine: a run, `jaxft plan` and `jaxft bench` take a method's train step from its Task
(`jaxft.tasks`), so what plan compiles is what a run compiles (as MaxText's AOT test checks)."""

import re
from pathlib import Path

import pytest

import jaxft.config
from jaxft.parallel.sharding import mesh_from_config
from jaxft.perf import plan as plan_lib
from jaxft.run import run
from jaxft.steps.optimizer import optimizer_from_config
from jaxft.tasks import TASKS, TrainStep
from tests.quickstart_subset import quickstart_head

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train.steps": 1, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
         "train.save_every": 1, "train.eval_every": 0, "mesh.data": 2, "mesh.fsdp": 4,
         "optim.warmup_steps": 0}
LORA = {"lora.rank": 4, "lora.alpha": 8.0}


def program(lowered) -> str:
    """A lowered step's StableHLO without debug info and with the private helper functions
    (`_where_63`, ...) left out and their calls named without the number: JAX numbers and
    deduplicates those helpers per process, so a run that lowered other code first names them
    differently. The public `main` (every argument's shape, sharding and donation) and every
    op of its body stay."""
    lines, in_private = [], False
    for line in lowered.as_text(debug_info=False).splitlines():
        if line.strip().startswith("func.func private"):
            in_private = True
        elif in_private:
            in_private = not line.startswith("  }")
        else:
            lines.append(re.sub(r"@(_?[A-Za-z]\w*?)_\d+\b", r"@\1", line))
    return "\n".join(lines)


@pytest.mark.parametrize("kind,overrides", [
    ("sft", {}),  # full fine-tuning, the default (chunked) loss
    ("dpo", {"dpo.precompute_reference": False}),  # a policy-copy reference: a leading argument
    ("dpo", {**LORA, "dpo.precompute_reference": False}),  # LoRA: the frozen base trails, reference = adapters off
], ids=["sft", "dpo-policy-reference", "dpo-lora-adapters-off"])
def test_plan_lowers_the_program_a_run_runs(kind, overrides, tmp_path, monkeypatch):
    name = "sft_train.jsonl" if kind == "sft" else "pref_train.jsonl"
    config = jaxft.config.load(f"{ROOT}/configs/{kind}.py:tiny", {
        **SMALL, **overrides, "data.train": str(quickstart_head(tmp_path, name, 16)), "data.eval": ""})
    lowered = []
    call = TrainStep.__call__

    def recording(self, state, batch):
        if not lowered:
            lowered.append(program(self.lower(state, batch)))
        return call(self, state, batch)

    monkeypatch.setattr(TrainStep, "__call__", recording)
    run(config, tmp_path / "run", kind=kind, export=False)

    mesh = mesh_from_config(config)
    tx, schedule = optimizer_from_config(config.optim, config.train.steps)
    planned = plan_lib.build_step(config, kind, plan_lib.plan_model_config(config), mesh, tx, schedule)
    assert program(planned.lower()) == lowered[0]
    assert "func.func public @main" in lowered[0] and len(lowered[0].splitlines()) > 500


def test_every_method_builds_its_step_and_batch_from_the_task():
    """plan and bench have no branch per method: each Task lays out its batch and builds its step."""
    for task in TASKS.values():
        assert callable(task.build_train_step) and callable(task.abstract_batch)
    source = "\n".join(f.read_text() for f in (ROOT / "jaxft" / "perf").glob("*.py"))
    for made_here in ("make_sft_step(", "make_dpo_step(", "jit_step(", "reference_mode"):
        assert made_here not in source, f"jaxft/perf builds a step itself ({made_here}): take it from the task"
