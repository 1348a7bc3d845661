"""What a folder on disk is to jaxft: a run's workdir, a Hugging Face model folder, a jaxft export.

Commands that read or write folders ask here first, so that a folder of the wrong kind is a
one-line error saying which kind was expected and where to find it (`runs/x/hf is already an
exported model folder; export reads a run's workdir (runs/x)`), and so that no command writes
into a run's workdir by mistake. Pure pathlib and json: the config's start-up validation
(no jax) uses it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

RUN_CONFIG = "config.json"  # a workdir's saved run config (io/checkpoint.py writes it)
CHECKPOINTS = "checkpoints"
HF_CONFIG = "config.json"  # a model folder's architecture
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PEFT_CONFIG = "adapter_config.json"
EXPORT_MARKER = "jaxft_export.json"  # written by jaxft.io.export into every folder it writes
RUN_EXPORT, RUN_ADAPTER = "hf", "adapter"  # what a finished run leaves in its workdir


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a jaxft run's workdir: it holds the saved run config (a config.json with
    model / data / train sections) or an Orbax checkpoints folder with numbered steps."""
    path = Path(path)
    saved = _json_object(path / RUN_CONFIG)
    if saved is not None and all(isinstance(saved.get(k), dict) for k in ("model", "data", "train")):
        return True
    steps = path / CHECKPOINTS
    return steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())


def enclosing_workdir(path: str | Path) -> Path | None:
    """`path` itself or its nearest parent folder that is a run's workdir, else None."""
    path = Path(path).absolute()
    return next((p for p in (path, *path.parents) if is_workdir(p)), None)


def is_model_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: a config.json naming a model_type, and safetensors weights."""
    path = Path(path)
    hf = _json_object(path / HF_CONFIG)
    return hf is not None and "model_type" in hf and any((path / w).is_file() for w in WEIGHTS)


def export_marker(path: str | Path) -> dict | None:
    """What jaxft wrote into `path` ({"layout": "hf" | "peft", ...}), or None if jaxft did not."""
    return _json_object(Path(path) / EXPORT_MARKER)


def describe(path: str | Path) -> str:
    """What `path` is, in a few words, for error messages."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a folder"
    if is_workdir(path):
        return "is a run's workdir"
    if is_model_folder(path):
        return "is a Hugging Face model folder"
    if (path / PEFT_CONFIG).is_file():
        return "is a PEFT adapter folder"
    return "is a folder with neither a model (config.json + model.safetensors) nor a run in it"


def model_folder(path: str | Path, *, flag: str = "--model") -> Path:
    """The Hugging Face model folder `path` names: `path` itself, or, for a run's workdir, its
    export WORKDIR/hf. Raises FileNotFoundError / ValueError saying what `path` is instead
    and what to pass (`flag` is the option or config key being read)."""
    path = Path(path)
    if is_workdir(path):
        if is_model_folder(path / RUN_EXPORT):
            logging.getLogger("jaxft").info("%s is a run's workdir: using its export %s", path, path / RUN_EXPORT)
            return path / RUN_EXPORT
        if (path / RUN_ADAPTER / PEFT_CONFIG).is_file():
            raise ValueError(
                f"{flag} {path} is a run's workdir with only a LoRA adapter ({path / RUN_ADAPTER}); write a "
                f"model folder with `jaxft export {path} --merge --out DIR`, then pass {flag} DIR")
        raise FileNotFoundError(
            f"{flag} {path} is a run's workdir without an export yet (a finished run writes {path / RUN_EXPORT}); "
            f"write one from its latest checkpoint with `jaxft export {path} --out DIR`, then pass {flag} DIR")
    check_model_folder(path, flag=flag)
    return path


def check_model_folder(path: str | Path, *, flag: str) -> None:
    """Raises unless `path` is a folder with a readable config.json naming a model_type; the
    message says what is there instead. (Weights are checked when they are read.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: the folder does not exist (give a Hugging Face model "
                                "folder: config.json + model.safetensors)")
    if not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give the Hugging Face model folder that holds it")
    if is_workdir(path):
        raise ValueError(f"{flag} {path} is a run's workdir, not a model folder: use {path / RUN_EXPORT} "
                         f"(its export), or `jaxft export {path} --out DIR` for a checkpoint")
    config = path / HF_CONFIG
    if not config.is_file():
        hint = (f"; {path} {describe(path)}" if (path / PEFT_CONFIG).is_file() else
                f"; did you mean {path / RUN_EXPORT}?" if is_model_folder(path / RUN_EXPORT) else "")
        raise FileNotFoundError(f"{flag} {path} has no config.json: a Hugging Face model folder holds "
                                f"config.json and model.safetensors{hint}")
    hf = _json_object(config)
    if hf is None:
        raise ValueError(f"{config}: not a JSON object (a truncated or damaged file?); re-export or "
                         "re-download the model")
    if "model_type" not in hf:
        raise ValueError(f"{config} has no model_type: not a Hugging Face model config")


def missing_local_folder(name: str) -> bool:
    """Whether `name` (a folder or a hub repo id such as "org/model") reads as a local path that
    does not exist: absolute, relative with ./ or ../, or deeper than org/model."""
    local = Path(name).is_absolute() or name.startswith(".") or name.strip("/").count("/") > 1
    return local and not Path(name).exists()
