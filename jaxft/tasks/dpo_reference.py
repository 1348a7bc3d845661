"""DPO's frozen reference: its params (a copy of the policy's start, or another HF folder), or
its log-probs precomputed once per pair and cached in the workdir.

`dpo.reference` = "policy" | HF folder | "none"; `dpo.precompute_reference` turns the params
into a table [N, 2] of (chosen, rejected) log-probs keyed by pair index, so the train step
does no reference forward and holds no reference weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.eval.passes import pair_pass
from jaxft.io import atomic
from jaxft.models.from_config import load_model, split_params

log = logging.getLogger("jaxft")

MODES = ("params", "table", "none")
CACHE_SUBDIR = "reference_logps"


def reference_mode(config) -> str:
    """"none" (reference-free), "table" (precomputed log-probs) or "params" (a forward per step)."""
    if config.dpo.reference == "none":
        return "none"
    return "table" if config.dpo.precompute_reference else "params"


def load_reference_params(ctx, policy_params) -> dict:
    """Frozen reference params: a copy of the policy's initial params, or another HF folder.
    With LoRA, "policy" is the frozen base itself (no copy: it is never donated or updated)."""
    config = ctx.config
    if config.dpo.reference in ("policy", "") and ctx.frozen is not None:
        return ctx.frozen
    if config.dpo.reference in ("policy", ""):
        # A copy: the policy's buffers are donated to the optimizer step and updated in place.
        return jax.tree.map(jnp.copy, policy_params)
    _, params = split_params(load_model(config, ctx.model_config, ctx.mesh, path=config.dpo.reference))
    return params


def precompute_table(logps_fn, ref_params, batches, mesh) -> np.ndarray:
    """[N, 2] reference (chosen, rejected) log-probs indexed by pair_index, NaN where absent."""
    out, index = pair_pass(logps_fn, ref_params, batches, mesh)
    table = np.full((int(index.max()) + 1 if len(index) else 0, 2), np.nan, np.float32)
    if len(index):
        table[index, 0], table[index, 1] = out["chosen"], out["rejected"]
    return table


def cache_key(config, train_fingerprint: str) -> dict:
    """What the reference log-probs of a run depend on (the table is reused when it matches)."""
    return {
        "data": config.data.train, "fingerprint": train_fingerprint,
        "reference": config.dpo.reference, "model": config.model.path or config.model.preset,
        "seed": config.train.seed, "max_length": config.data.max_length, "packing": config.data.packing,
    }


def _load_table(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(table, None), or (None, what is wrong with the file)."""
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # numpy: "cannot reshape array of size ..."
        return None, f"{type(err).__name__}: {err}"
    if table.ndim != 2 or table.shape[1] != 2 or table.dtype != np.float32:
        return None, f"shape {table.shape} {table.dtype}, expected [N, 2] float32"
    return table, None


def cached_table(workdir: Path, key: dict, compute) -> np.ndarray:
    """The table stored in WORKDIR/reference_logps/<hash>.npy for `key`, computed once. A
    stored table that does not read back whole (truncated, not a [N, 2] float table) is
    recomputed, with a warning, and replaced."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = workdir / CACHE_SUBDIR / f"{digest}.npy"
    if path.is_file():
        table, problem = _load_table(path)
        if problem is None:
            log.info("reusing precomputed reference log-probs %s", path)
            return table
        log.warning("precomputed reference log-probs %s do not read back (%s): recomputing them", path, problem)
    table = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Each file replaced whole (jaxft.io.atomic): a kill leaves the old file or the new one.
        # The .json only says what the table was computed from; the table is the cache.
        atomic.write_text(path.with_suffix(".json"), json.dumps(key, indent=2, default=str))
        array = io.BytesIO()
        np.save(array, table)
        atomic.write_bytes(path, array.getvalue())
    return table
