"""`jaxft export`: a training checkpoint -> a Hugging Face model folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
from flax import nnx

from jaxft import config as config_lib
from jaxft.data.from_config import load_tokenizer
from jaxft.io import checkpoint
from jaxft.models import ModelConfig, abstract_model, save_hf
from jaxft.models.adapters import adapter_shardings, lora_graphdef, merge_adapters
from jaxft.models.from_config import load_model, model_config, split_params
from jaxft.models.peft import save_peft
from jaxft.models.quantize import QuantizedKernel

log = logging.getLogger("jaxft")
from jaxft.parallel.sharding import mesh_from_config, param_shardings


def export_params(graphdef, params, out: str | Path, *, tokenizer=None, dtype=None) -> Path:
    """Writes policy `params` (nested dict) with `graphdef`'s architecture as an HF folder,
    in `dtype` (default: the param dtype, e.g. float32 master weights)."""
    model = nnx.merge(graphdef, params)
    return save_hf(model, out, tokenizer=tokenizer, dtype=dtype)


def export_merged(cfg: ModelConfig, base: dict, adapters: dict, out: str | Path, *, tokenizer=None,
                  dtype=None) -> Path:
    """A LoRA model as a plain HF folder: every adapter folded into its kernel (W + s A B)."""
    graphdef, _ = nnx.split(abstract_model(cfg.replace(lora=None)), nnx.Param)
    return export_params(graphdef, merge_adapters(cfg, base, adapters), out, tokenizer=tokenizer, dtype=dtype)


def export_adapter(cfg: ModelConfig, adapters: dict, out: str | Path, *, base_model: str = "",
                   tokenizer=None) -> Path:
    """A LoRA model's adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors,
    the tokenizer) for `peft.PeftModel.from_pretrained(base, out)`."""
    folder = save_peft(cfg, adapters, out, base_model=base_model)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(folder)
    return folder


def export_run(cfg: ModelConfig, graphdef, params: dict, frozen: dict | None, workdir: Path, *,
               base_model: str = "", tokenizer=None) -> tuple[Path, Path | None]:
    """What a finished run leaves: WORKDIR/hf (a full HF folder, adapters merged for LoRA) and,
    for LoRA, WORKDIR/adapter (the PEFT adapter). Returns (hf folder, adapter folder or None)."""
    if frozen is None:
        return export_params(graphdef, params, workdir / "hf", tokenizer=tokenizer), None
    adapter = export_adapter(cfg, params, workdir / "adapter", base_model=base_model, tokenizer=tokenizer)
    if any(isinstance(x, QuantizedKernel) for x in jax.tree.leaves(frozen, is_leaf=_is_quantized)):
        # A quantized base is not what to merge into: `jaxft export WORKDIR --merge` re-reads
        # model.path at full precision and merges there (as PEFT merges into the original base).
        log.info("QLoRA: wrote the adapter only; jaxft export %s --merge --out DIR writes a merged model", workdir)
        return None, adapter
    return export_merged(cfg, frozen, params, workdir / "hf", tokenizer=tokenizer), adapter


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedKernel)


EXPORT_KINDS = ("full", "merge", "adapter")


def export_checkpoint(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype=None,
                      kind: str | None = None) -> Path:
    """Restores the policy params of `step` (default latest) from `workdir` and exports them
    with the run's tokenizer and chat template.

    kind: "full" (a full fine-tuning run: its params), "merge" (a LoRA run: the base from
    model.path with the adapters merged in) or "adapter" (a LoRA run: a PEFT folder); None
    picks "full" or "merge" from the run's config."""
    workdir = checkpoint.workdir_path(workdir)
    saved = checkpoint.read_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{workdir}/config.json not found: is {workdir} a jaxft workdir?")
    config = config_lib.from_json(json.dumps(saved))
    tokenizer = load_tokenizer(config)
    cfg = model_config(config, tokenizer)
    kind = kind or ("merge" if cfg.lora else "full")
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind {kind!r}: choose from {', '.join(EXPORT_KINDS)}")
    if (kind == "full") != (cfg.lora is None):
        raise ValueError(f"{workdir} is a {'LoRA' if cfg.lora else 'full fine-tuning'} run: "
                         + ("use --merge (a full HF folder) or --adapter (a PEFT folder)" if cfg.lora
                            else "--merge / --adapter apply to LoRA runs only (lora.rank > 0)"))
    mesh = mesh_from_config(config)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
    if step is not None and step not in available:
        raise ValueError(f"--step {step} is not a saved step of {workdir}; saved steps: {available}")
    with jax.set_mesh(mesh):
        if cfg.lora is None:
            graphdef, abstract_state = nnx.split(abstract_model(cfg), nnx.Param)
            shardings = nnx.to_pure_dict(param_shardings(abstract_state, mesh))
        else:
            graphdef, abstract_state, _ = lora_graphdef(cfg)
            shardings = adapter_shardings(cfg, mesh)
        abstract_params = checkpoint.abstract_like(nnx.to_pure_dict(abstract_state), shardings)
        params = ckpt.restore_params(step, abstract_params)
        ckpt.close()
        if kind == "full":
            return export_params(graphdef, params, out, tokenizer=tokenizer, dtype=dtype)
        if kind == "adapter":
            return export_adapter(cfg, params, out, base_model=config.model.path, tokenizer=tokenizer)
        _, base = split_params(load_model(config, cfg, mesh))
        return export_merged(cfg, base, params, out, tokenizer=tokenizer, dtype=dtype)
