"""The model a run config describes: its architecture (`model_config`) and its weights
(`load_model`), plus the functional split used inside jit."""

from __future__ import annotations

import logging

import jax
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.io.folders import check_model_folder
from jaxft.models.adapters import init_adapters
from jaxft.models import grouped_matmul
from jaxft.models.attention import resolve
from jaxft.models.config import ModelConfig, parse_dtype, read_hf_config
from jaxft.models.hf import abstract_model, create_model, load_weights
from jaxft.models.lora import LoRASpec, resolve_targets
from jaxft.models.peft import load_peft
from jaxft.models.quantize import quantize_base, quantized_shardings, quantizer
from jaxft.parallel.sharding import param_shardings
from jaxft.models.presets import get_preset

log = logging.getLogger("jaxft")


def model_config(config, tokenizer) -> ModelConfig:
    """The architecture: model.path's config.json, or model.preset sized to the tokenizer."""
    dtype = parse_dtype(config.model.dtype or None, key="model.dtype")
    if config.model.path:
        check_model_folder(config.model.path, flag="model.path")  # e.g. moved since the run was saved
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
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}; "
            "use the model's own tokenizer (model.tokenizer)"
        )
    resolve(config.model.attention)  # an unknown name fails here, naming model.attention
    grouped_matmul.resolve(config.model.moe_matmul)  # and model.moe_matmul
    # A saved config older than a key reads the value its run had (jaxft.config.upgrade).
    return cfg.replace(compute_dtype=compute or cfg.param_dtype, remat=config.model.remat,
                       attention=config.model.attention, scan_layers=bool(config.model.scan_layers),
                       moe_matmul=config.model.moe_matmul, lora=lora_spec(config),
                       linear_chunk_size=config.model.linear_chunk_size or None)


def base_quantization(config) -> str:
    """lora.base_quantization ("none" for configs from before QLoRA: jaxft.config.upgrade)."""
    return config.lora.base_quantization


def lora_spec(config) -> LoRASpec | None:
    """The adapters lora.* asks for, or None (full fine-tuning: lora.rank 0)."""
    section = config.lora
    if section.rank == 0:
        return None
    return LoRASpec(rank=int(section.rank), alpha=float(section.alpha),
                    targets=resolve_targets(section.targets), rslora=bool(section.rslora),
                    dropout=float(section.dropout))


def load_model(config, cfg: ModelConfig, mesh, *, path: str | None = None, transform=None, keep_mxfp4=False):
    """Weights from `path` (default model.path) or a fresh init from train.seed, sharded.
    Always the base model: LoRA adapters come from `load_trainable`. keep_mxfp4: an MXFP4
    checkpoint's experts reach `transform` packed (`load_weights`)."""
    path = path if path is not None else config.model.path
    cfg = cfg.replace(lora=None)
    if path:
        log.info("loading %s", path)
        if path != config.model.path:  # another folder (a DPO reference): its own architecture
            check_model_folder(path, flag="dpo.reference")
            cfg = read_hf_config(path, dtype=cfg.param_dtype).replace(
                compute_dtype=cfg.compute_dtype, remat=cfg.remat, scan_layers=cfg.scan_layers,
                attention=cfg.attention)
        return load_weights(path, cfg, mesh=mesh, transform=transform, keep_mxfp4=keep_mxfp4)
    log.info("initialising %s preset with random weights (seed %d)", config.model.preset, config.train.seed)
    return create_model(cfg, seed=config.train.seed, mesh=mesh)


def load_trainable(config, cfg: ModelConfig, mesh) -> tuple[object, dict, dict | None]:
    """(graphdef, trainable params, frozen params or None) of the run's model.

    Full fine-tuning trains every param (frozen None). With LoRA (cfg.lora) the trainable
    params are the adapters (fresh from train.seed, or lora.init_from's PEFT folder) and the
    frozen ones the base; `nnx.merge(graphdef, trainable, frozen)` is the model."""
    quantization = base_quantization(config) if cfg.lora is not None else "none"
    transform = shardings = None
    if quantization != "none":  # QLoRA: each kernel quantized as it is loaded
        log.info("storing the frozen base as %s (lora.base_quantization)", quantization)
        with jax.set_mesh(mesh):
            _, abstract = nnx.split(abstract_model(cfg.replace(lora=None)), nnx.Param)
        kernel_shardings = nnx.to_pure_dict(param_shardings(abstract, mesh))
        shardings = quantized_shardings(cfg, nnx.to_pure_dict(abstract), kernel_shardings, quantization, mesh)
        transform = quantizer(cfg, quantization, shardings)
    graphdef, base = split_params(load_model(config, cfg, mesh, transform=transform,
                                             keep_mxfp4=quantization == "mxfp4"))  # gpt-oss's own codes
    if cfg.lora is None:
        return graphdef, base, None
    if quantization != "none" and not config.model.path:  # a preset's random init: quantize it now
        base = quantize_base(cfg, base, quantization, shardings)
    graphdef, adapters = init_adapters(cfg, seed=config.train.seed, mesh=mesh)
    if config.lora.init_from:
        log.info("starting the adapters from %s", config.lora.init_from)
        adapters = load_peft(config.lora.init_from, cfg, mesh)
    return graphdef, adapters, base


def split_params(model):
    """(graphdef, params as a plain nested dict): the functional form used inside jit."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)
