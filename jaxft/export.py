"""`jaxft export`: a training checkpoint -> a Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from jaxft import builders, checkpoint, config as config_lib
from jaxft.models import save_hf


def export_params(graphdef, params, out: str | Path, *, tokenizer=None, dtype=None) -> Path:
    """Writes policy `params` (nested dict) with `graphdef`'s architecture as an HF folder,
    in `dtype` (default: the param dtype, e.g. float32 master weights)."""
    model = nnx.merge(graphdef, params)
    return save_hf(model, out, tokenizer=tokenizer, dtype=dtype)


def export_checkpoint(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype=None) -> Path:
    """Restores the policy params of `step` (default latest) from `workdir` and exports them
    with the run's tokenizer and chat template."""
    workdir = builders.workdir_path(workdir)
    saved = checkpoint.read_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{workdir}/config.json not found: is {workdir} a jaxft workdir?")
    config = config_lib.from_json(json.dumps(saved))
    tokenizer = builders.load_tokenizer(config)
    cfg = builders.model_config(config, tokenizer)
    mesh = builders.mesh_from_config(config)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
    if step is not None and step not in available:
        raise ValueError(f"--step {step} is not a saved step of {workdir}; saved steps: {available}")
    with jax.set_mesh(mesh):
        from jaxft.models import abstract_model
        from jaxft.sharding import param_shardings

        graphdef, abstract_state = nnx.split(abstract_model(cfg), nnx.Param)
        shardings = nnx.to_pure_dict(param_shardings(abstract_state, mesh))
        abstract_params = checkpoint.abstract_like(nnx.to_pure_dict(abstract_state), shardings)
        params = ckpt.restore_params(step, abstract_params)
    ckpt.close()
    return export_params(graphdef, params, out, tokenizer=tokenizer, dtype=dtype)
