"""`jaxft export`: a training checkpoint -> a Hugging Face model folder.

Every export (`jaxft export`, a finished run's WORKDIR/hf and WORKDIR/adapter) is written
whole into a temporary folder next to the target, its ownership marker (folders.EXPORT_MARKER)
included, and renamed into place when complete (`jaxft.io.atomic.replace_folder`): a killed
export leaves the previous folder (or none) plus a hidden temporary folder that the next
export of the same target removes, so the same command can be rerun as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import jax
from flax import nnx

from jaxft import config as config_lib
from jaxft.data.from_config import load_tokenizer
from jaxft.errors import ConfigError, PathError
from jaxft.io import atomic, checkpoint, folders
from jaxft.models import ModelConfig, abstract_model, save_hf
from jaxft.models.adapters import adapter_shardings, lora_graphdef, merge_adapters
from jaxft.models.from_config import load_model, model_config, split_params
from jaxft.models.peft import save_peft
from jaxft.models.quantize import QuantizedKernel

from jaxft.parallel.sharding import mesh_from_config, param_shardings

log = logging.getLogger("jaxft")


def export_params(graphdef, params, out: str | Path, *, tokenizer=None, dtype=None) -> Path:
    """Writes policy `params` (nested dict) with `graphdef`'s architecture as an HF folder,
    in `dtype` (default: the param dtype, e.g. float32 master weights)."""
    model = nnx.merge(graphdef, params)
    with _export_folder(out, "hf") as folder:
        save_hf(model, folder, tokenizer=tokenizer, dtype=dtype)
    return Path(out)


def export_merged(cfg: ModelConfig, base: dict, adapters: dict, out: str | Path, *, tokenizer=None,
                  dtype=None) -> Path:
    """A LoRA model as a plain HF folder: every adapter folded into its kernel (W + s A B)."""
    graphdef, _ = nnx.split(abstract_model(cfg.replace(lora=None)), nnx.Param)
    return export_params(graphdef, merge_adapters(cfg, base, adapters), out, tokenizer=tokenizer, dtype=dtype)


def export_adapter(cfg: ModelConfig, adapters: dict, out: str | Path, *, base_model: str = "",
                   tokenizer=None) -> Path:
    """A LoRA model's adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors,
    the tokenizer) for `peft.PeftModel.from_pretrained(base, out)`."""
    with _export_folder(out, "peft") as folder:
        save_peft(cfg, adapters, folder, base_model=base_model)
        if tokenizer is not None and jax.process_index() == 0:
            tokenizer.save_pretrained(folder)
    return Path(out)


@contextlib.contextmanager
def _export_folder(out: str | Path, layout: str):
    """The folder to write an export of `layout` ("hf" / "peft") into. On process 0: a temporary
    folder that replaces `out` when the block completes, signed first as a jaxft export
    (folders.EXPORT_MARKER: a later export may overwrite it, and nothing else, see
    `check_export_target`). Other processes only take part in gathering the arrays (save_hf /
    save_peft write on process 0 only): they get `out` and write nothing."""
    if jax.process_index() != 0:
        yield Path(out)
        return
    from jaxft import __version__

    with atomic.replace_folder(out) as tmp:
        (tmp / folders.EXPORT_MARKER).write_text(
            json.dumps({"layout": layout, "written_by": f"jaxft {__version__}"}) + "\n")
        yield tmp


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
LAYOUTS = {"full": "hf", "merge": "hf", "adapter": "peft"}  # what each kind writes


def check_export_source(workdir: Path) -> dict:
    """The saved run config of `workdir`; raises, saying what `workdir` is instead, unless it
    is a run's workdir (export reads runs, not model folders)."""
    if folders.is_model_folder(workdir) or (workdir / folders.PEFT_CONFIG).is_file():
        run = folders.enclosing_workdir(workdir.parent)
        what = "an exported model folder" if folders.is_model_folder(workdir) else "a PEFT adapter folder"
        raise ConfigError(f"{workdir} is already {what}; export reads a run's workdir ("
                         + (f"{run}" if run else "the --workdir of jaxft sft / dpo") + "). To use this folder, "
                         "pass it to jaxft generate / eval --model, or as model.path")
    saved = checkpoint.read_config(workdir) if (workdir / folders.RUN_CONFIG).is_file() else None
    if saved is None:
        raise PathError(f"{workdir}/config.json not found: {workdir} {folders.describe(workdir)}; "
                                "export reads a run's workdir (the --workdir of jaxft sft / dpo)")
    if not all(isinstance(saved.get(k), dict) for k in ("model", "data", "train")):
        raise ConfigError(f"{workdir}/config.json is not a jaxft run config (no model / data / train sections): "
                         "export reads a run's workdir (the --workdir of jaxft sft / dpo)")
    return saved


def check_export_target(out: str | Path, layout: str) -> Path:
    """`out` as an absolute path, if an export may write there: a new or empty folder, or one
    that jaxft exported before in the same `layout` ("hf" or "peft"; save_hf and save_peft
    replace their own files). Never a run's workdir or a folder inside one (its config.json,
    checkpoints and final export would be overwritten), never a folder of other files."""
    out = Path(out).absolute()
    run = folders.enclosing_workdir(out)
    if run is not None:
        where = "is the run workdir" if run == out else f"is inside the run workdir {run}"
        raise ConfigError(f"--out {out} {where}: export never writes into a run's folder (its config, "
                         f"checkpoints and final export stay as they are); choose a folder outside it, "
                         f"e.g. --out {run.parent / (run.name + '-export')}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: export writes a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = folders.export_marker(out)
        if marker is None:
            raise ConfigError(f"--out {out} is not empty and is not a folder jaxft exported (no "
                             f"{folders.EXPORT_MARKER}): export overwrites only its own exports; choose a "
                             "new or empty folder")
        if marker.get("layout") != layout:
            raise ConfigError(f"--out {out} holds a jaxft {marker.get('layout')!r} export and this one is "
                             f"{layout!r}: choose another folder, or delete that one first")
    return out


def export_checkpoint(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype=None,
                      kind: str | None = None) -> Path:
    """Restores the policy params of `step` (default latest) from `workdir` and exports them
    with the run's tokenizer and chat template.

    kind: "full" (a full fine-tuning run: its params), "merge" (a LoRA run: the base from
    model.path with the adapters merged in) or "adapter" (a LoRA run: a PEFT folder); None
    picks "full" or "merge" from the run's config."""
    workdir = checkpoint.workdir_path(workdir)
    config = config_lib.from_saved(check_export_source(workdir), f"{workdir}/config.json")  # upgraded, typed
    if kind is not None and kind not in EXPORT_KINDS:
        raise ConfigError(f"export kind {kind!r}: choose from {', '.join(EXPORT_KINDS)}")
    lora = config.lora.rank > 0
    kind = kind or ("merge" if lora else "full")
    if (kind == "full") == lora:
        raise ConfigError(f"{workdir} is a {'LoRA' if lora else 'full fine-tuning'} run: "
                         + ("use --merge (a full HF folder) or --adapter (a PEFT folder)" if lora
                            else "--merge / --adapter apply to LoRA runs only (lora.rank > 0)"))
    out = check_export_target(out, LAYOUTS[kind])  # before anything is loaded or written
    tokenizer = load_tokenizer(config)
    cfg = model_config(config, tokenizer)
    mesh = mesh_from_config(config)
    if not (workdir / folders.CHECKPOINTS).is_dir():  # else Orbax would create it
        raise PathError(f"no checkpoints under {workdir / folders.CHECKPOINTS}")
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    available = ckpt.all_steps()
    if not available:
        raise PathError(f"no checkpoints under {ckpt.directory}")
    if step is not None and step not in available:
        raise ConfigError(f"--step {step} is not a saved step of {workdir}; saved steps: {available}")
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
