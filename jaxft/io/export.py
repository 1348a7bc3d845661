"""`jaxft export`: a training checkpoint -> a Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from jaxft import config as config_lib
from jaxft.data.from_config import load_tokenizer
from jaxft.io import checkpoint
from jaxft.models import abstract_model, save_hf
from jaxft.models.from_config import model_config
from jaxft.parallel.sharding import mesh_from_config, param_shardings


def export_params(graphdef, params, out: str | Path, *, tokenizer=None, dtype=None) -> Path:
    """Writes policy `params` (nested dict) with `graphdef`'s architecture as an HF folder,
    in `dtype` (default: the param dtype, e.g. float32 master weights)."""
    model = nnx.merge(graphdef, params)
    return save_hf(model, out, tokenizer=tokenizer, dtype=dtype)


def export_checkpoint(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype=None) -> Path:
    """Restores the policy params of `step` (default latest) from `workdir` and exports them
    with the run's tokenizer and chat template."""
    workdir = checkpoint.workdir_path(workdir)
    saved = checkpoint.read_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{workdir}/config.json not found: is {workdir} a jaxft workdir?")
    config = config_lib.from_json(json.dumps(saved))
    tokenizer = load_tokenizer(config)
    cfg = model_config(config, tokenizer)
    mesh = mesh_from_config(config)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
    if step is not None and step not in available:
        raise ValueError(f"--step {step} is not a saved step of {workdir}; saved steps: {available}")
    with jax.set_mesh(mesh):
        graphdef, abstract_state = nnx.split(abstract_model(cfg), nnx.Param)
        shardings = nnx.to_pure_dict(param_shardings(abstract_state, mesh))
        abstract_params = checkpoint.abstract_like(nnx.to_pure_dict(abstract_state), shardings)
        params = ckpt.restore_params(step, abstract_params)
    ckpt.close()
    return export_params(graphdef, params, out, tokenizer=tokenizer, dtype=dtype)
