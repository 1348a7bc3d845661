"""Per-method glue between the loop and the pure steps: jit with shardings, eval, best ckpt.

A `Task` bundles what `jaxft.train` needs from a training method:
  step(state, batch) -> (state, metrics)          the jitted train step
  evaluate(params, eval_batches) -> {eval_*: ...}  held-out metrics
  save_best(step, state, value)                    keep-best checkpoint (train.keep_best)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax

from jaxft import checkpoint, sharding
from jaxft.train_step import jit_step, make_sft_eval_step, make_sft_step


@dataclasses.dataclass
class Task:
    step: Callable
    evaluate: Callable
    save_best: Callable


def _best_saver(workdir: Path):
    holder = {}

    def save_best(step, state, value):
        if "ckpt" not in holder:
            holder["ckpt"] = checkpoint.Checkpointer(workdir, max_to_keep=1, subdir="checkpoints_best",
                                                     async_save=False)
        holder["ckpt"].save(step, state, {"eval_loss": value}, force=True)

    return save_best


def sum_over_batches(eval_fn, params, batches, mesh) -> dict:
    """Sums the scalar outputs of `eval_fn(params, batch)` over host-local `batches`."""
    from jaxft.train import to_global

    totals: dict = {}
    for batch in batches:
        out = jax.device_get(eval_fn(params, to_global(batch, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def build_sft(config, graphdef, tx, schedule, mesh, *, state_shardings, workdir: Path) -> Task:
    step = make_sft_step(graphdef, tx, schedule, accumulate=config.optim.accumulate,
                         loss_chunk_size=config.train.loss_chunk_size)
    jitted = jit_step(step, state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh))
    eval_fn = jax.jit(make_sft_eval_step(graphdef, loss_chunk_size=config.train.loss_chunk_size),
                      in_shardings=(state_shardings["params"], sharding.batch_sharding(mesh)))

    def evaluate(params, batches):
        t = sum_over_batches(eval_fn, params, batches, mesh)
        n = max(t.get("num_tokens", 0.0), 1.0)
        return {"eval_loss": t["nll_sum"] / n, "eval_mean_token_accuracy": t["num_correct"] / n,
                "eval_num_tokens": t.get("num_tokens", 0.0)}

    return Task(step=jitted, evaluate=evaluate, save_best=_best_saver(workdir))


def build(kind, config, graphdef, tx, schedule, params, mesh, tokenizer, *, state_shardings,
          workdir, train_iterator) -> Task:
    if kind == "sft":
        return build_sft(config, graphdef, tx, schedule, mesh, state_shardings=state_shardings,
                         workdir=workdir)
    if kind == "dpo":
        from jaxft.dpo_task import build_dpo

        return build_dpo(config, graphdef, tx, schedule, params, mesh, tokenizer,
                         state_shardings=state_shardings, workdir=workdir, train_iterator=train_iterator)
    raise ValueError(f"unknown training kind {kind!r}")


