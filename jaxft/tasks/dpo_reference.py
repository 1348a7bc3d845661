"""DPO's frozen reference, an explicit variant (`reference_variant`):

  policy        a copy of the policy's initial params (dpo.reference "policy"), a forward per step
  folder        another HF folder's params (dpo.reference PATH), a forward per step
  adapters_off  with LoRA and dpo.reference "policy": the frozen base with the adapters off (no copy)
  table         dpo.precompute_reference: log-probs of the reference above, precomputed once per
                pair into a table [N, 2] keyed by pair index and cached in the workdir; the
                step does no reference forward and holds no reference weights
  none          dpo.reference "none": reference-free (reference log-probs 0)

`Reference` is what the train step takes; `prepare_reference` builds the run's (loading a
folder, precomputing a table: the reference pass is a step of its own, `precompute_table`),
`abstract_reference` the shapes `jaxft plan` compiles with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.data.from_config import eval_batch_size
from jaxft.eval.passes import pair_pass
from jaxft.io import atomic
from jaxft.models.adapters import adapters_off
from jaxft.models.from_config import load_model, split_params
from jaxft.parallel.sharding import replicated

log = logging.getLogger("jaxft")

VARIANTS = ("policy", "folder", "adapters_off", "table", "none")
# What the step does with each variant (`jaxft.steps.dpo.make_dpo_step`'s reference_mode).
STEP_MODES = {"policy": "params", "folder": "params", "adapters_off": "params", "table": "table", "none": "none"}
CACHE_SUBDIR = "reference_logps"


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference argument of the DPO train step: params (policy, folder), a [N, 2] table,
    or nothing (adapters_off: the step reads the frozen base; none); `shardings` its in_shardings."""
    variant: str
    value: Any = None
    shardings: Any = None

    @property
    def mode(self) -> str:
        return STEP_MODES[self.variant]


def reference_variant(config, *, lora: bool) -> str:
    """The variant dpo.reference and dpo.precompute_reference ask for (LoRA: "policy" is the base)."""
    if config.dpo.reference == "none":
        return "none"
    if config.dpo.precompute_reference:
        return "table"
    if config.dpo.reference in ("policy", ""):
        return "adapters_off" if lora else "policy"
    return "folder"


def _shardings(params):
    """The shardings of a params tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, params)


def reference_params(ctx, policy_params):
    """The weights the reference forward merges, before any step: a policy copy, a folder's
    params, or with LoRA (adapters off, frozen base or folder params)."""
    config = ctx.config
    if config.dpo.reference in ("policy", ""):
        # A copy: the policy's buffers are donated to the optimizer step and updated in place.
        source = ctx.weights.frozen if ctx.weights.lora else jax.tree.map(jnp.copy, policy_params)
    else:
        _, source = split_params(load_model(config, ctx.model_config, ctx.mesh, path=config.dpo.reference))
    return (adapters_off(policy_params), source) if ctx.weights.lora else source


def prepare_reference(ctx, policy_params, logps_fn) -> tuple[Reference, Any]:
    """(the train step's Reference, what evaluation compares against: the reference's merge
    weights for a live pass, the held-out table, or None). The table variant runs the
    reference pass over the data once (`cached_table`) and keeps no reference weights."""
    variant = reference_variant(ctx.config, lora=ctx.weights.lora)
    if variant == "none":
        return Reference("none"), None
    if variant == "adapters_off":
        return Reference("adapters_off"), (adapters_off(policy_params), ctx.weights.frozen)
    if variant == "table":
        train, held_out = precompute_tables(ctx, reference_params(ctx, policy_params), logps_fn)
        return Reference("table", train, replicated(ctx.mesh)), held_out
    weights = reference_params(ctx, policy_params)
    params = weights[1] if ctx.weights.lora else weights
    return Reference(variant, params, _shardings(params)), weights


def abstract_reference(setup, params, *, pairs: int) -> Reference:
    """The Reference a run of `setup.config` gives its step, as shapes: the table has a row
    per pair of `max(train.steps, 1)` batches of `pairs` (a run's is one per pair of its data:
    arguments, not temporaries; a few bytes each); a folder is planned as the policy's
    architecture."""
    variant = reference_variant(setup.config, lora=setup.weights.lora)
    if variant == "table":
        rows = max(pairs * max(setup.config.train.steps, 1), 1)
        mesh = setup.mesh
        return Reference("table", jax.ShapeDtypeStruct((rows, 2), jnp.float32, sharding=replicated(mesh)),
                         replicated(mesh))
    if variant in ("policy", "folder"):
        if setup.weights.lora:  # the folder's full params, laid out as the (unquantized) base
            from flax import nnx

            from jaxft.models.adapters import lora_graphdef
            from jaxft.parallel.sharding import param_shardings

            with jax.set_mesh(setup.mesh):
                _, _, base = lora_graphdef(setup.model_config)
                shardings = nnx.to_pure_dict(param_shardings(base, setup.mesh))
            params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nnx.to_pure_dict(base), shardings)
        return Reference(variant, params, _shardings(params))
    return Reference(variant)


def precompute_tables(ctx, weights, logps_fn) -> tuple[jax.Array, np.ndarray | None]:
    """(train table, held-out table or None): one reference pass (`weights`) over the data
    the run has loaded, or the tables an earlier run with the same key cached."""
    key = cache_key(ctx.config, ctx.train_data.get_state()["fingerprint"])

    def table(split_key, batches):
        return cached_table(ctx.workdir, {**key, **split_key},
                            lambda: precompute_table(logps_fn, weights, batches, ctx.mesh))

    train = jnp.asarray(table({"split": "train"}, ctx.train_data.one_pass(eval_batch_size(ctx.config))))
    held_out = None
    if ctx.eval_data is not None:
        held_out = table({"split": "eval", "eval": ctx.config.data.eval}, ctx.eval_data)
    return train, held_out


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
