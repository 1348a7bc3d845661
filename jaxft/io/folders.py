"""What a folder on disk is to jaxft: a run's workdir, a Hugging Face model folder, a jaxft export.

Commands that read or write folders ask here first, so that a folder of the wrong kind is a
one-line error saying which kind was expected and where to find it (`runs/x/hf is already an
exported model folder; export reads a run's workdir (runs/x)`), and so that no command writes
into a run's workdir by mistake. Pure pathlib and json: the config's start-up validation
(no jax) uses it too.

The workdir rule (`check_workdir`, before a run writes anything): a run trains into a folder
that is missing, empty (hidden entries such as .DS_Store aside), or a jaxft run (its
config.json, checkpoints/, run.lock, metrics.jsonl or a sweep's record: a run killed before
its first checkpoint is rerun, not refused). Everything else is refused, saying what it is:
a file, a Hugging Face model / tokenizer folder, a jaxft export, a PEFT adapter, a dataset,
a folder of runs, any other non-empty folder, a folder inside one of those or inside a run,
and a folder that is, holds the outputs of, or sits inside a path the config reads
(model.path, model.tokenizer, dpo.reference, lora.init_from, data.train, data.eval).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jaxft.data.mixture import parse_mixture
from jaxft.errors import ConfigError, DataError, PathError

RUN_CONFIG = "config.json"  # a workdir's saved run config (io/checkpoint.py writes it)
CHECKPOINTS = "checkpoints"
HF_CONFIG = "config.json"  # a model folder's architecture
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PEFT_CONFIG = "adapter_config.json"
EXPORT_MARKER = "jaxft_export.json"  # written by jaxft.io.export into every folder it writes
RUN_EXPORT, RUN_ADAPTER = "hf", "adapter"  # what a finished run leaves in its workdir
RUN_LOCK = "run.lock"  # jaxft.io.lock.LOCK_NAME: taken before a run writes anything
METRICS = "metrics.jsonl"
SWEEP_RECORD = "sweep_run.json"  # jaxft.sweep.runner.RECORD: written just before its run starts
# Everything a run (and `jaxft plot`) writes at the top of its workdir.
RUN_OUTPUTS = frozenset({
    RUN_CONFIG, CHECKPOINTS, "checkpoints_best", "checkpoints_unrestorable", METRICS, RUN_LOCK,
    RUN_EXPORT, RUN_ADAPTER, "data_cache", "reference_logps", "tensorboard", "wandb", "wandb_id",
    "metrics.png", SWEEP_RECORD})
# A folder holding any of these is a model (or part of one), never a workdir.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
               "adapter_model.safetensors", "adapter_model.bin")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".arrow")  # optionally .gz / .zst
DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")  # `datasets.save_to_disk`


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


def is_run_folder(path: str | Path) -> bool:
    """Whether jaxft started a run in `path`: a workdir (`is_workdir`) or a run stopped before
    its first checkpoint (run.lock, checkpoints/, metrics.jsonl, a sweep's record)."""
    path = Path(path)
    return is_workdir(path) or any((path / name).exists() for name in (RUN_LOCK, CHECKPOINTS, METRICS, SWEEP_RECORD))


def _entries(path: Path) -> list[Path]:
    """The folder's entries, hidden ones (.DS_Store, a killed write's .tmp- file) left out."""
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _is_data_file(path: Path) -> bool:
    name = path.name.lower()
    for compression in (".gz", ".zst"):
        name = name.removesuffix(compression)
    return path.is_file() and (name.endswith(DATA_SUFFIXES) or path.name in DATASET_FILES)


def _model_kind(path: Path) -> str | None:
    """What model-like thing the folder `path` is (an export, an adapter, a Hugging Face model or
    tokenizer folder, loose weights), in words, else None."""
    marker = export_marker(path)
    if marker is not None:
        return f"is a jaxft export ({EXPORT_MARKER}, layout {marker.get('layout', '?')!r})"
    if (path / PEFT_CONFIG).is_file():
        return f"is a PEFT adapter folder ({PEFT_CONFIG})"
    hf = _json_object(path / HF_CONFIG)
    found = ([HF_CONFIG] if hf is not None and "model_type" in hf else [])
    found += [name for name in MODEL_FILES if (path / name).is_file()]
    found += [p.name for p in path.glob("*.safetensors") if p.name not in found][:1]
    return f"is a Hugging Face model folder ({', '.join(found[:3])})" if found else None


def _not_a_run(path: Path) -> str | None:
    """What `path` (an existing folder) is when jaxft must not write a run into it, else None."""
    model = _model_kind(path)
    if model:
        key = "lora.init_from" if "adapter" in model else "model.path"
        return (f"{model}: a run would write its config.json over the model's (to train from it, "
                f"set --config.{key}={path})")
    if is_run_folder(path):
        return None
    entries = _entries(path)
    if not entries:
        return None
    data = [p.name for p in entries if _is_data_file(p)]
    if data:
        return (f"is a dataset folder ({', '.join(data[:3])}{', ...' if len(data) > 3 else ''}; to train "
                f"on it, set --config.data.train={path})")
    runs = [p.name for p in entries if p.is_dir() and is_run_folder(p)]
    if runs:
        return (f"holds runs ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}) but is not one: "
                f"give each run its own folder, e.g. {path / 'NEW_RUN'}")
    shown = [p.name + ("/" if p.is_dir() else "") for p in entries[:4]]
    return (f"is a folder with other files in it ({', '.join(shown)}{', ...' if len(entries) > 4 else ''}) "
            "and no jaxft run")


def config_inputs(config) -> list[tuple[str, Path]]:
    """(config key, local path) of each existing file or folder a run `config` reads: the
    model, tokenizer, DPO reference, LoRA adapter and data sources (a mixture's files, a
    glob's folder). Hub names and missing paths are left out."""
    def get(section, key):
        return str(getattr(getattr(config, section), key))

    found = [(f"model.{k}", get("model", k)) for k in ("path", "tokenizer")]
    found.append(("lora.init_from", get("lora", "init_from")))
    if get("dpo", "reference") not in ("", "policy", "none"):
        found.append(("dpo.reference", get("dpo", "reference")))
    for key in ("data.train", "data.eval"):
        spec = get("data", key.split(".")[1])
        try:
            sources = [source for source, _ in parse_mixture(spec, key, require_weights=False)] if spec.strip() else []
        except ValueError:  # a malformed mixture is the data loader's error to report
            sources = spec.split(",")
        for source in sources:
            if any(c in source for c in "*?["):  # a glob: the folder it reads from
                source = str(Path(source.split("*")[0].split("?")[0].split("[")[0] + "x").parent)
            found.append((key, source.strip()))
    return [(key, Path(value).expanduser()) for key, value in found if value and Path(value).expanduser().exists()]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def workdir_problem(path: str | Path, config=None) -> str | None:
    """Why a run must not write into `path`, in words (see the module docstring), or None when
    it may: missing, an empty folder, or a jaxft run. `config` (a run config) adds the paths
    it reads: the workdir may not be one of them, be inside one, or hold one among its outputs."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        hint = f" (a dataset? to train on it, set --config.data.train={path})" if _is_data_file(path) else ""
        return f"is a file, not a folder{hint}"
    above = _nearest_existing(path)
    if not above.is_dir():
        return f"is under {above}, which is a file, not a folder"
    real, inputs = path.resolve(), [] if config is None else config_inputs(config)
    for key, value in inputs:
        value = value.resolve()
        if _within(real, value):
            where = "is" if real == value else f"is inside {value}, the path of"
            return f"{where} config key {key}: the run would write into what it reads"
    problem = _not_a_run(path) if path.is_dir() else None
    if problem:
        return problem
    for parent in path.parents:
        model = _model_kind(parent) if parent.is_dir() else None
        if model:
            return f"is inside {parent}, which {model}"
        if is_workdir(parent):
            return f"is inside the run {parent}: a run's workdir holds no other run"
    for key, value in inputs:
        value = value.resolve()
        if _within(value, real) and value.relative_to(real).parts[0] in RUN_OUTPUTS:
            return (f"holds config key {key} ({value}) where the run writes its own "
                    f"{value.relative_to(real).parts[0]}: the run would replace what it reads")
    return None


def _nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder (or file) above it that exists."""
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor or "."))


def check_output(path: str | Path, flag: str, *, folder: bool) -> Path:
    """`path` as a place to write a folder (`folder`) or a file: a PathError naming `flag` unless
    it is missing or of that kind, and the nearest existing path above it is a folder (where a
    file's parent must already exist). Python's own error would come from deep in the write."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise PathError(f"{flag} {path} is a {'file' if folder else 'folder'}; give "
                        f"{'a folder' if folder else 'a file name'} to write")
    above = _nearest_existing(path.parent)
    if not above.is_dir():
        raise PathError(f"{flag} {path}: {above} is a file, not a folder")
    if not folder and above != path.parent:
        raise PathError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    return path


def check_workdir(path: str | Path, config=None) -> None:
    """Raises ConfigError, saying what `path` is and what to do, unless a run may write into it
    (`workdir_problem`). Called by `jaxft.run` before anything is written."""
    problem = workdir_problem(path, config)
    if problem:
        raise ConfigError(f"workdir {path} {problem}. A run needs a new or empty folder, or a jaxft run's "
                         f"workdir to resume: give another --workdir")


def model_folder(path: str | Path, *, flag: str = "--model") -> Path:
    """The Hugging Face model folder `path` names: `path` itself, or, for a run's workdir, its
    export WORKDIR/hf. Raises PathError / ConfigError saying what `path` is instead
    and what to pass (`flag` is the option or config key being read)."""
    path = Path(path)
    if is_workdir(path):
        if is_model_folder(path / RUN_EXPORT):
            logging.getLogger("jaxft").info("%s is a run's workdir: using its export %s", path, path / RUN_EXPORT)
            return path / RUN_EXPORT
        if (path / RUN_ADAPTER / PEFT_CONFIG).is_file():
            raise ConfigError(
                f"{flag} {path} is a run's workdir with only a LoRA adapter ({path / RUN_ADAPTER}); write a "
                f"model folder with `jaxft export {path} --merge --out DIR`, then pass {flag} DIR")
        raise PathError(
            f"{flag} {path} is a run's workdir without an export yet (a finished run writes {path / RUN_EXPORT}); "
            f"write one from its latest checkpoint with `jaxft export {path} --out DIR`, then pass {flag} DIR")
    check_model_folder(path, flag=flag)
    return path


def check_model_folder(path: str | Path, *, flag: str) -> None:
    """Raises unless `path` is a folder with a readable config.json naming a model_type; the
    message says what is there instead. (Weights are checked when they are read.)"""
    path = Path(path)
    if not path.exists():
        raise PathError(f"{flag} {path}: the folder does not exist (give a Hugging Face model "
                                "folder: config.json + model.safetensors)")
    if not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give the Hugging Face model folder that holds it")
    if is_workdir(path):
        raise ConfigError(f"{flag} {path} is a run's workdir, not a model folder: use {path / RUN_EXPORT} "
                         f"(its export), or `jaxft export {path} --out DIR` for a checkpoint")
    config = path / HF_CONFIG
    if not config.is_file():
        hint = (f"; {path} {describe(path)}" if (path / PEFT_CONFIG).is_file() else
                f"; did you mean {path / RUN_EXPORT}?" if is_model_folder(path / RUN_EXPORT) else "")
        raise PathError(f"{flag} {path} has no config.json: a Hugging Face model folder holds "
                                f"config.json and model.safetensors{hint}")
    hf = _json_object(config)
    if hf is None:
        raise DataError(f"{config}: not a JSON object (a truncated or damaged file?); re-export or "
                         "re-download the model")
    if "model_type" not in hf:
        raise DataError(f"{config} has no model_type: not a Hugging Face model config")


def missing_local_folder(name: str) -> bool:
    """Whether `name` (a folder or a hub repo id such as "org/model") reads as a local path that
    does not exist: absolute, relative with ./ or ../, or deeper than org/model."""
    local = Path(name).is_absolute() or name.startswith(".") or name.strip("/").count("/") > 1
    return local and not Path(name).exists()
