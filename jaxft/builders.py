"""Start-up pieces shared by `jaxft sft`, `jaxft dpo`, eval and export: tokenizer, model, mesh."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from flax import nnx

from jaxft import sharding
from jaxft.models import create_model, get_preset, load_weights, read_hf_config
from jaxft.models.config import ModelConfig, parse_dtype

log = logging.getLogger("jaxft")


def load_tokenizer(config):
    """The tokenizer named by model.tokenizer, else model.path's, else the bundled one."""
    from transformers import AutoTokenizer

    source = config.model.tokenizer or config.model.path
    if not source:
        from jaxft.data.make_tokenizer import load_bundled_tokenizer

        return load_bundled_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {source!r} (config key "
            f"{'model.tokenizer' if config.model.tokenizer else 'model.path'}): {err}"
        ) from err


def model_config(config, tokenizer) -> ModelConfig:
    """The architecture: model.path's config.json, or model.preset sized to the tokenizer."""
    dtype = parse_dtype(config.model.dtype or None, key="model.dtype")
    if config.model.path:
        cfg = read_hf_config(config.model.path, dtype=dtype)
    else:
        cfg = get_preset(config.model.preset)
        cfg = cfg.replace(
            vocab_size=max(cfg.vocab_size, len(tokenizer)),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if dtype is not None:
            cfg = cfg.replace(param_dtype=dtype)
    compute = parse_dtype(config.model.compute_dtype or None, key="model.compute_dtype")
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}; "
            "use the model's own tokenizer (model.tokenizer)"
        )
    return cfg.replace(compute_dtype=compute or cfg.param_dtype, remat=bool(config.model.remat))


def load_model(config, cfg: ModelConfig, mesh, *, path: str | None = None):
    """Weights from `path` (default model.path) or a fresh init from train.seed, sharded."""
    path = path if path is not None else config.model.path
    if path:
        log.info("loading %s", path)
        if path != config.model.path:  # another folder (a DPO reference): its own architecture
            cfg = read_hf_config(path, dtype=cfg.param_dtype).replace(
                compute_dtype=cfg.compute_dtype, remat=cfg.remat)
        return load_weights(path, cfg, mesh=mesh)
    log.info("initialising %s preset with random weights (seed %d)", config.model.preset, config.train.seed)
    return create_model(cfg, seed=config.train.seed, mesh=mesh)


def load_kwargs(config) -> dict:
    """The data.* options of `jaxft.data.tokenize.load_examples`."""
    return dict(fmt=config.data.format, truncation=config.data.truncation,
                skip_invalid=config.data.skip_invalid,
                completion_only_loss=config.data.completion_only_loss,
                chat_template=config.data.chat_template or None)


def mesh_from_config(config):
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def check_batch_divisibility(config, mesh, *, rows_per_example: int = 1) -> None:
    """Batch sizes must split evenly over hosts, micro-batches and the batch mesh axes."""
    batch = config.train.batch_size
    accumulate = config.optim.accumulate
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_rows = batch // accumulate * rows_per_example
    if jax.process_count() > 1 and batch % jax.process_count():
        raise ValueError(
            f"train.batch_size={batch} is not divisible by the number of hosts ({jax.process_count()})"
        )
    if micro_rows % shards:
        raise ValueError(
            f"train.batch_size / optim.accumulate = {batch // accumulate} is not divisible by "
            f"mesh.data * mesh.fsdp = {shards}; choose a batch size that is a multiple of {shards}"
            f" per micro-batch"
        )


def split_params(model):
    """(graphdef, params as a plain nested dict) — the functional form used inside jit."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef, params):
    return nnx.merge(graphdef, params)


def workdir_path(workdir: str | Path) -> Path:
    return Path(workdir).absolute()
