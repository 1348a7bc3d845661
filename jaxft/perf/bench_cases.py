"""What `jaxft bench` times: a `Case` per step kind (a compiled jaxft step, or another library's
step as a call), run in interleaved rounds (`measure`), and jaxft's cases built from the tasks
(`jax_cases`: each kind's step as a run builds it, from the presetless recipes' run configs)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp

from jaxft.models import create_model
from jaxft.models.adapters import init_adapters
from jaxft.models.from_config import split_params
from jaxft.models.lora import PROJECTIONS, LoRASpec
from jaxft.parallel import sharding
from jaxft.perf.bench_setup import run_config
from jaxft.steps.common import ROW_KEYS
from jaxft.steps.optimizer import make_optimizer
from jaxft.steps.state import create_train_state
from jaxft.steps.weights import Weights
from jaxft.tasks import StepSetup, TrainStep
from jaxft.tasks.dpo import DPO
from jaxft.tasks.dpo_reference import Reference
from jaxft.tasks.sft import SFT

KINDS = ("sft", "sft_full_logits", "dpo", "dpo_reference")
# With --lora RANK: the LoRA SFT step (adapters train, the base is frozen) and DPO with adapters,
# its reference the base with the adapters off (a live forward, no second copy).
LORA_KINDS = ("sft_lora", "dpo_lora")
_ROUND_S = 1.0  # steps=None: about this long a round per kind (1 to 5 steps)
_MAX_AUTO_STEPS = 5


@dataclasses.dataclass
class Case:
    """One timed step kind: `run(n)` runs n steps back to back, waits for them and returns
    seconds per step; `compile_s` is the first call (trace + compile + one step)."""

    run: Callable[[int], float]
    compile_s: float
    peak_bytes: int | None = None


def _peak_bytes(compiled) -> int | None:
    """Bytes one device holds while the compiled step runs: inputs + outputs - the donated
    buffers outputs reuse + XLA's scratch."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def jax_case(step: TrainStep, holder: dict, batch) -> Case:
    """Compiles the task's `step(state, batch)` ahead of time and times that plus a first step.
    All cases share `holder["state"]`: each step donates it and leaves the new one there."""
    start = time.perf_counter()
    args = (*step.leading, batch, *step.trailing)
    compiled = step.lower(holder["state"], batch).compile()
    holder["state"] = jax.block_until_ready(compiled(holder["state"], *args)[0])
    compile_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        state = holder["state"]
        for _ in range(n):  # dispatch ahead; wait once, at the end
            state = compiled(state, *args)[0]
        holder["state"] = jax.block_until_ready(state)
        return (time.perf_counter() - start) / n

    return Case(run, compile_s, _peak_bytes(compiled))


def host_case(step: Callable[[], None]) -> Case:
    """Another library's step (a call that returns when the step is done); `compile_s` is its
    first call (PyTorch: eager; Tunix: trace + compile + one step)."""
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n

    return Case(run, compile_s)


def measure(cases: dict[str, Case], *, steps: int | None, rounds: int) -> dict[str, tuple[float, int]]:
    """{name: (best seconds per step, steps per round)}. A warm-up step each, then interleaved
    rounds, best of each: a noisy neighbour slows every case alike, and the best round is the
    one least disturbed."""
    per_round = {}
    for name, case in cases.items():
        warm = case.run(1)
        per_round[name] = steps or max(1, min(_MAX_AUTO_STEPS, math.ceil(_ROUND_S / warm)))
    best = {name: math.inf for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            best[name] = min(best[name], case.run(per_round[name]))
    return {name: (best[name], per_round[name]) for name in cases}


def _setup(method: str, chunk_size: int | None, *, cfg, weights, tx, schedule, shardings, mesh) -> StepSetup:
    """The StepSetup of `method`'s run config (`bench_setup.run_config`) on the bench's model."""
    return StepSetup(config=run_config(method, chunk_size), model_config=cfg, mesh=mesh, weights=weights, tx=tx,
                     schedule=schedule, state_shardings=shardings)


def _lora_cases(cfg, rank: int, base, tx, schedule, mesh, chunk_size) -> Callable[[dict, dict], dict[str, Case]]:
    """`cases(sft_batch, dpo_batch)` -> {"sft_lora", "dpo_lora"}: LoRA of `rank` on every
    projection (alpha 2 x rank) over the frozen `base`; DPO's reference is the adapters off."""
    lora_cfg = cfg.replace(lora=LoRASpec(rank=rank, alpha=2.0 * rank, targets=PROJECTIONS))
    graphdef, adapters = init_adapters(lora_cfg, seed=1, mesh=mesh)
    state, shardings = create_train_state(adapters, tx, mesh)
    holder = {"state": state}
    kw = dict(cfg=lora_cfg, weights=Weights.of(graphdef, shardings["params"], base), tx=tx, schedule=schedule,
              shardings=shardings, mesh=mesh)

    def cases(sft_batch, batch):
        sft = SFT.build_train_step(_setup("sft", chunk_size, **kw))
        dpo = DPO.build_train_step(_setup("dpo", chunk_size, **kw), Reference("adapters_off"))
        return {"sft_lora": jax_case(sft, holder, sft_batch), "dpo_lora": jax_case(dpo, holder, batch)}

    return cases


def jax_cases(cfg, *, batch_size: int, chunk_size: int | None, lora_rank: int, mesh) -> Callable[[dict], dict]:
    """`cases(host_batch)` -> {kind: Case} for jaxft's kinds (and the LoRA kinds when
    lora_rank > 0): the `cfg` model from seed 0, each kind's step as a run builds it
    (`jaxft.tasks`, from the presetless recipes' run configs), all sharing one train state.
    Call under `jax.set_mesh(mesh)`."""
    replicated = sharding.replicated(mesh)
    graphdef, params = split_params(create_model(cfg, seed=0, mesh=mesh))
    tx, schedule = make_optimizer(lr=1e-5, schedule="constant", total_steps=1)
    reference = jax.tree.map(jnp.copy, params)  # the frozen reference: a policy copy
    state, shardings = create_train_state(params, tx, mesh)
    holder = {"state": state}
    table = jax.device_put(jnp.zeros((batch_size // 2, 2), jnp.float32), replicated)
    # The policy's initial params stay untouched (the full cases train copies): the LoRA base.
    lora = _lora_cases(cfg, lora_rank, params, tx, schedule, mesh, chunk_size) if lora_rank else None
    kw = dict(cfg=cfg, weights=Weights.of(graphdef, shardings["params"]), tx=tx, schedule=schedule,
              shardings=shardings, mesh=mesh)
    steps = {"sft": SFT.build_train_step(_setup("sft", chunk_size, **kw)),
             "sft_full_logits": SFT.build_train_step(_setup("sft", 0, **kw)),
             "dpo": DPO.build_train_step(_setup("dpo", chunk_size, **kw), Reference("table", table, replicated)),
             "dpo_reference": DPO.build_train_step(_setup("dpo", chunk_size, **kw), Reference(
                 "policy", reference, jax.tree.map(lambda x: x.sharding, reference)))}

    def cases(host: dict) -> dict[str, Case]:
        rows = sharding.batch_sharding(mesh)
        batch = {k: jax.device_put(v, rows if v.ndim == 2 else replicated) for k, v in host.items()}
        sft_batch = {k: batch[k] for k in ROW_KEYS}
        out = {name: jax_case(step, holder, sft_batch if name.startswith("sft") else batch)
               for name, step in steps.items()}
        if lora:
            out.update(lora(sft_batch, batch))
        return out

    return cases
