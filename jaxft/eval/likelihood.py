"""Likelihood metrics of any model on a data source, computed by the train steps' own
functions: token-mean eval loss, and per-pair log-probs for preference accuracy."""

from __future__ import annotations

import jax
import numpy as np

from jaxft.data.pipeline import make_eval_batches
from jaxft.eval.metrics import preference_accuracy
from jaxft.eval.passes import pair_pass, sum_over_batches, token_metrics
from jaxft.models.from_config import split_params
from jaxft.parallel.sharding import make_mesh, replicated
from jaxft.steps.dpo import make_pair_logps_fn
from jaxft.steps.sft import make_sft_eval_step


def _replicated_params(model, mesh):
    graphdef, params = split_params(model)
    return graphdef, jax.device_put(params, replicated(mesh))


def eval_loss(model, tokenizer, source: str, *, max_length: int = 512, batch_size: int = 16,
              limit: int | None = None) -> dict:
    """Token-mean loss and accuracy over the trained tokens of every record of `source`
    (any SFT format), exactly as `eval_loss` is computed during training."""
    mesh = make_mesh(data=-1)
    batches = make_eval_batches(source, tokenizer, kind="sft", batch_size=batch_size, max_length=max_length,
                                packing=False, process_index=jax.process_index(),
                                process_count=jax.process_count(), load_kwargs={"limit": limit})
    with jax.set_mesh(mesh):
        graphdef, params = _replicated_params(model, mesh)
        totals = sum_over_batches(jax.jit(make_sft_eval_step(graphdef)), params, batches, mesh)
    metrics = token_metrics(totals)
    return {k: metrics[k] for k in ("eval_loss", "eval_mean_token_accuracy")}


def preference_logps(model, tokenizer, source: str, *, max_length: int, batch_size: int = 32,
                     mesh=None) -> dict[str, np.ndarray]:
    """Summed completion log-probs and completion lengths of `model` on every pair of
    `source`, in pair-index order ({chosen, rejected, chosen_lengths, rejected_lengths}, each
    [N]): for the preference accuracy of any model, trained or not."""
    mesh = mesh or make_mesh(data=-1)
    batches = make_eval_batches(source, tokenizer, kind="dpo", batch_size=batch_size, max_length=max_length,
                                packing=False, process_index=jax.process_index(),
                                process_count=jax.process_count())
    with jax.set_mesh(mesh):
        graphdef, params = _replicated_params(model, mesh)
        out, index = pair_pass(jax.jit(make_pair_logps_fn(graphdef, num_segments=1)), params, batches, mesh)
    order = np.argsort(index, kind="stable")
    return {k: v[order] for k, v in out.items()}


def preference_eval(model, tokenizer, source: str, *, reference=None, beta: float = 0.1,
                    max_length: int = 512, batch_size: int = 16) -> dict:
    """Preference accuracy on held-out pairs: with a `reference` model, TRL's implicit-reward
    accuracy (beta * (log pi - log ref) of chosen > rejected); without, the share of pairs
    whose chosen answer has the higher per-token log-prob."""
    pol = preference_logps(model, tokenizer, source, max_length=max_length, batch_size=batch_size)
    out = {"num_pairs": int(len(pol["chosen"]))}
    if reference is not None:
        ref = preference_logps(reference, tokenizer, source, max_length=max_length, batch_size=batch_size)
        out["reward_accuracy"] = preference_accuracy(pol["chosen"], pol["rejected"], ref["chosen"],
                                                     ref["rejected"], beta=beta)
    chosen = pol["chosen"] / np.maximum(pol["chosen_lengths"], 1)
    rejected = pol["rejected"] / np.maximum(pol["rejected_lengths"], 1)
    out["preference_accuracy"] = float(np.mean(chosen > rejected))
    return out
