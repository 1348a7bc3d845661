"""DPO set-up for the training loop: the reference (params, precomputed table or none),
the jitted step, and held-out preference metrics."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import builders, losses, sharding
from jaxft.dpo import dpo_loss_kwargs, jit_dpo_step, make_dpo_step, make_pair_logps_fn
from jaxft.step_builders import Task, _best_saver

log = logging.getLogger("jaxft")


def reference_mode(config) -> str:
    if config.dpo.reference == "none":
        return "none"
    return "table" if config.dpo.precompute_reference else "params"


def load_reference_params(config, policy_params, mesh, tokenizer):
    """Frozen reference params: a copy of the policy's initial params, or another HF folder."""
    if config.dpo.reference in ("policy", ""):
        # A copy: the policy's buffers are donated to the optimizer step and updated in place.
        return jax.tree.map(jnp.copy, policy_params)
    model_cfg = builders.model_config(config, tokenizer)
    model = builders.load_model(config, model_cfg, mesh, path=config.dpo.reference)
    _, params = builders.split_params(model)
    return params


def _global_pairs(batch_np) -> tuple[np.ndarray, np.ndarray]:
    """(pair_mask, pair_index) of the whole global batch, in the order `to_global` uses."""
    mask, index = np.asarray(batch_np.pair_mask), np.asarray(batch_np.pair_index)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
        index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
    return mask > 0, index


def _pass_logps(logps_fn, params, batches, mesh):
    """Concatenated per-pair outputs of `logps_fn` over `batches` (real pairs only) + indices."""
    from jaxft.train import to_global

    parts, indices = [], []
    for batch in batches:
        out = jax.device_get(logps_fn(params, to_global(batch, mesh)))
        valid, index = _global_pairs(batch)
        parts.append({k: np.asarray(v)[valid] for k, v in out.items()})
        indices.append(index[valid])
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return joined, (np.concatenate(indices) if indices else np.zeros(0, np.int64))


def precompute_table(logps_fn, ref_params, batches, mesh) -> np.ndarray:
    """[N, 2] reference (chosen, rejected) log-probs indexed by pair_index, NaN where absent."""
    out, index = _pass_logps(logps_fn, ref_params, batches, mesh)
    table = np.full((int(index.max()) + 1 if len(index) else 0, 2), np.nan, np.float32)
    if len(index):
        table[index, 0], table[index, 1] = out["chosen"], out["rejected"]
    return table


def cached_table(workdir: Path, key: dict, compute) -> np.ndarray:
    """The table stored in WORKDIR/reference_logps/<hash>.npy for `key`, computed once."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = workdir / "reference_logps" / f"{digest}.npy"
    if path.is_file():
        log.info("reusing precomputed reference log-probs %s", path)
        return np.load(path)
    table = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, table)
        tmp.rename(path)  # atomic: a killed run never leaves a half-written table
        (path.with_suffix(".json")).write_text(json.dumps(key, indent=2, default=str))
    return table


def build_dpo(config, graphdef, tx, schedule, params, mesh, tokenizer, *, state_shardings,
              workdir: Path, train_iterator) -> Task:
    from jaxft.data.pipeline import make_eval_batches

    mode = reference_mode(config)
    num_segments = getattr(train_iterator, "max_segments_per_row", 1)
    chunk = config.train.loss_chunk_size
    logps_fn = jax.jit(make_pair_logps_fn(graphdef, num_segments=num_segments, loss_chunk_size=chunk))
    load_kwargs = builders.load_kwargs(config)
    eval_batches_cache = {}

    def passes(source):
        if source not in eval_batches_cache:
            eval_batches_cache[source] = make_eval_batches(
                source, tokenizer, kind="dpo", batch_size=config.data.eval_batch_size or config.train.batch_size,
                max_length=config.data.max_length, packing=config.data.packing,
                process_index=jax.process_index(), process_count=jax.process_count(), load_kwargs=load_kwargs,
                max_segments_per_row=config.data.max_segments_per_row)
        return eval_batches_cache[source]

    reference = None
    ref_params = None
    eval_reference = None
    if mode != "none":
        ref_params = load_reference_params(config, params, mesh, tokenizer)
    if mode == "table":
        key = {
            "data": config.data.train, "fingerprint": train_iterator.get_state().get("fingerprint"),
            "reference": config.dpo.reference, "model": config.model.path or config.model.preset,
            "seed": config.train.seed, "max_length": config.data.max_length, "packing": config.data.packing,
        }
        reference = jnp.asarray(cached_table(
            workdir, {**key, "split": "train"},
            lambda: precompute_table(logps_fn, ref_params, passes(config.data.train), mesh)))
        if config.data.eval:
            eval_reference = jnp.asarray(cached_table(
                workdir, {**key, "split": "eval", "eval": config.data.eval},
                lambda: precompute_table(logps_fn, ref_params, passes(config.data.eval), mesh)))
        ref_params = None  # freed: no reference forward per step from here on
    elif mode == "params":
        reference = eval_reference = ref_params

    step = make_dpo_step(graphdef, tx, schedule, loss_kwargs=dpo_loss_kwargs(config), reference_mode=mode,
                         num_segments=num_segments, rows_per_pair=1 if config.data.packing else 2,
                         accumulate=config.optim.accumulate, loss_chunk_size=chunk)
    ref_shardings = (jax.tree.map(lambda x: x.sharding, reference) if mode == "params"
                     else sharding.replicated(mesh) if mode == "table" else None)
    jitted = jit_dpo_step(step, state_shardings=state_shardings, reference_shardings=ref_shardings, mesh=mesh)

    def train_step(state, batch):
        return jitted(state, reference, batch)

    def evaluate(params, batches):
        return preference_metrics(logps_fn, params, eval_reference, mode, batches, mesh, config)

    return Task(step=train_step, evaluate=evaluate, save_best=_best_saver(workdir))


def preference_metrics(logps_fn, params, reference, mode, batches, mesh, config, prefix="eval_") -> dict:
    """DPO loss and TRL reward metrics over held-out pairs (eval_loss, eval_rewards/accuracies...)."""
    from jaxft.dpo import dpo_loss_kwargs

    pol, index = _pass_logps(logps_fn, params, batches, mesh)
    if not len(index):
        return {}
    if mode == "params":
        ref, _ = _pass_logps(logps_fn, reference, batches, mesh)
        ref_c, ref_r = ref["chosen"], ref["rejected"]
    elif mode == "table":
        table = np.asarray(reference)
        ref_c, ref_r = table[index, 0], table[index, 1]
    else:
        ref_c = ref_r = np.zeros(len(index), np.float32)
    loss, metrics = losses.dpo_loss(
        jnp.asarray(pol["chosen"]), jnp.asarray(pol["rejected"]), jnp.asarray(ref_c), jnp.asarray(ref_r),
        chosen_lengths=jnp.asarray(pol["chosen_lengths"]), rejected_lengths=jnp.asarray(pol["rejected_lengths"]),
        **dpo_loss_kwargs(config),
    )
    out = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
    out[f"{prefix}loss"] = float(loss)
    return out


def preference_logps(model, tokenizer, source: str, *, max_length: int, batch_size: int = 32,
                     mesh=None) -> dict[str, np.ndarray]:
    """Summed completion log-probs and completion lengths of `model` on every pair of
    `source`, in pair-index order ({chosen, rejected, chosen_lengths, rejected_lengths}, each
    [N]): for the preference accuracy of any model, trained or not."""
    from jaxft.data.pipeline import make_eval_batches

    mesh = mesh or sharding.make_mesh(data=-1)
    graphdef, params = builders.split_params(model)
    batches = make_eval_batches(source, tokenizer, kind="dpo", batch_size=batch_size, max_length=max_length,
                                packing=False, process_index=jax.process_index(),
                                process_count=jax.process_count())
    logps_fn = jax.jit(make_pair_logps_fn(graphdef, num_segments=1))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.replicated(mesh))
        out, index = _pass_logps(logps_fn, params, batches, mesh)
    order = np.argsort(index, kind="stable")
    return {k: v[order] for k, v in out.items()}
