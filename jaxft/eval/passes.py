"""One pass of a jitted function over host-local eval batches, reduced on the host.

Shared by evaluation during training (`jaxft.tasks`), the DPO reference precomputation and
`jaxft eval`, so held-out numbers are computed one way everywhere.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxft.parallel.batches import to_global


def sum_over_batches(eval_fn, params, batches, mesh) -> dict[str, float]:
    """Sums the scalar outputs of `eval_fn(params, batch)` over `batches`."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_fn(params, to_global(batch, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def token_metrics(totals: dict[str, float]) -> dict[str, float]:
    """eval_loss (token mean), eval_mean_token_accuracy and eval_num_tokens from the sums of
    `jaxft.steps.sft.make_sft_eval_step`."""
    n = max(totals.get("num_tokens", 0.0), 1.0)
    return {"eval_loss": totals.get("nll_sum", 0.0) / n,
            "eval_mean_token_accuracy": totals.get("num_correct", 0.0) / n,
            "eval_num_tokens": totals.get("num_tokens", 0.0)}


def pair_pass(logps_fn, params, batches, mesh) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-pair outputs of `logps_fn(params, batch)` over `batches`, real pairs only, each
    [N], and their pair indices [N]. A batch's pair arrays cover the global batch on every
    host, so every host gets every pair."""
    parts, indices = [], []
    for batch in batches:
        out = jax.device_get(logps_fn(params, to_global(batch, mesh)))
        real = np.asarray(batch.pair_mask) > 0
        parts.append({k: np.asarray(v)[real] for k, v in out.items()})
        indices.append(np.asarray(batch.pair_index)[real])
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return joined, (np.concatenate(indices) if indices else np.zeros(0, np.int64))
