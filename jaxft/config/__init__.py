"""The config schema: every key with its default, start-up validation with clear errors, and
`load`, which builds a config from a file the way the CLI does.

Config files under `configs/` start from `base_config()` and change what their recipe needs.
The returned ConfigDict is locked: setting a key that does not exist (a typo on the command
line, `--config.optim.lrr=1e-5`) fails at start-up instead of being silently ignored.

In a notebook:

    config = jaxft.config.load("configs/sft.py:tiny", overrides={"train.steps": 100})

Some keys say one thing two ways (RIVALS): train.steps or train.epochs, optim.warmup_steps or
optim.warmup_ratio. The step count wins when both are set, and the one the user gives
(--config.KEY, `load(overrides=...)`, a sweep) is the one that counts: `--config.train.epochs=2`
on a preset that fixes train.steps trains 2 epochs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_collections


from jaxft.config.schema import (  # noqa: E402,F401  the schema: every key, its type, default and doc
    Config, base_config, from_dict, key_table, typed)


# Pairs of keys that set one thing two ways: each is given when > 0, and the first wins when
# both are (steps over epochs, as TRL's max_steps; warmup_steps over warmup_ratio, as HF's
# Trainer). A config file sets either; the user overriding one (and not the other) gets it:
# `clear_rivals` sets its rival to 0, "not given".
RIVALS = (("train.steps", "train.epochs"), ("optim.warmup_steps", "optim.warmup_ratio"))
_RIVAL = {key: rival for pair in RIVALS for key, rival in (pair, pair[::-1])}


def clear_rivals(config: ml_collections.ConfigDict, given: Iterable[str]) -> None:
    """Sets to 0 the rival (RIVALS) of each key of `given` (the keys the user set, already set in
    `config`) that is > 0, unless `given` holds the rival too. (A user's `train.steps=0` keeps
    the file's epochs.)"""
    given = set(given)
    for key in given & _RIVAL.keys():
        if _RIVAL[key] not in given and _get(config, key) > 0:
            _override(config, _RIVAL[key], 0)


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """One overrides dict of `layers`, later ones winning: a key of a later layer replaces that
    key and drops its rival (RIVALS) from the earlier ones. (A sweep run's own train.epochs beats
    a --config.train.steps given to every run.)"""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = {k: v for k, v in merged.items() if _RIVAL.get(k) not in layer} | dict(layer)
    return merged


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values that would otherwise fail deep inside training, or do something no one
    asks for (delete checkpoints, train backwards); names the key and its allowed values. Each
    numeric key's range and the meaning of 0 / -1 are the comments in `base_config`.
    (Method-specific keys, such as dpo.*, are checked by the method's Task.)"""
    def need(ok, key, msg):
        if not ok:
            raise ValueError(f"config key {key}: {msg}, got {_get(config, key)!r}")

    def finite(key):
        value = _get(config, key)
        need(isinstance(value, (int, float)) and math.isfinite(value), key, "must be a finite number")
        return value

    if not (config.model.path or config.model.preset):
        raise ValueError("config key model.path: no model; set --config.model.path=HF_FOLDER (or model.preset, "
                         "e.g. configs/sft.py:tiny)")
    if not config.data.train:
        raise ValueError("config key data.train: no training data; set --config.data.train=FILE")
    train, data, optim = config.train, config.data, config.optim
    need(train.batch_size > 0, "train.batch_size", "must be >= 1")
    need(train.steps >= 0, "train.steps", "must be >= 0 (0 = not given: train.epochs sets the length)")
    need(finite("train.epochs") >= 0, "train.epochs", "must be >= 0 (0 = not given: train.steps sets the length)")
    if data.streaming:
        need(train.steps > 0, "train.steps", "must be > 0 with data.streaming=True (a stream has "
             "no known length, so train.epochs cannot set the run's length)")
    need(train.steps > 0 or train.epochs > 0, "train.steps", "must be > 0 (or set train.epochs)")
    need(optim.accumulate >= 1, "optim.accumulate", "must be >= 1")
    need(train.batch_size % optim.accumulate == 0, "optim.accumulate",
         f"must divide train.batch_size={train.batch_size}")
    need(finite("optim.lr") > 0, "optim.lr", "must be > 0")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0 (0 = not given: optim.warmup_ratio)")
    need(0.0 <= finite("optim.warmup_ratio") < 1.0, "optim.warmup_ratio", "must be in [0, 1)")
    need(0.0 <= finite("optim.min_lr_ratio") <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    need(finite("optim.weight_decay") >= 0, "optim.weight_decay", "must be >= 0")
    need(finite("optim.clip_norm") >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
    for key in ("optim.b1", "optim.b2"):
        need(0.0 <= finite(key) < 1.0, key, "must be in [0, 1)")
    need(finite("optim.eps") > 0, "optim.eps", "must be > 0")
    need(data.max_length > 1, "data.max_length", "must be >= 2")
    need(data.max_segments_per_row >= 1, "data.max_segments_per_row", "must be >= 1")
    need(data.eval_batch_size >= 0, "data.eval_batch_size", "must be >= 0 (0 = train.batch_size)")
    need(data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    need(data.truncation in ("truncate_completion", "drop"), "data.truncation",
         "must be 'truncate_completion' or 'drop'")
    need(train.log_every > 0, "train.log_every", "must be >= 1")
    need(train.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
    need(train.max_to_keep >= 0, "train.max_to_keep", "must be >= 0 (0 = keep every checkpoint)")
    need(train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1 (1 = stop at the first non-finite step)")
    need(data.num_proc >= 0, "data.num_proc", "must be >= 0 (0 = every core)")
    need(data.max_record_bytes >= 0, "data.max_record_bytes", "must be >= 0 (0 = no limit)")
    need(train.eval_every >= -1, "train.eval_every", "must be >= 0 (0 = at the end), or -1 for every epoch")
    need(train.loss_chunk_size >= -1, "train.loss_chunk_size", "must be >= 0 (0 = whole), or -1 (auto)")
    need(train.prefetch >= 0, "train.prefetch", "must be >= 0 (0 = on demand)")
    need(train.preemption_check_every >= 1, "train.preemption_check_every", "must be >= 1")
    sizes = {axis: _get(config, f"mesh.{axis}") for axis in config.mesh}
    for axis, size in sizes.items():
        need(size == -1 or size >= 1, f"mesh.{axis}", "must be >= 1, or -1 for the devices left")
    need(list(sizes.values()).count(-1) <= 1, "mesh.data", f"only one mesh axis may be -1 (mesh {sizes})")
    from jaxft.io.trackers import parse_report_to  # jax-free

    parse_report_to(train.report_to)  # unknown names and missing packages, named
    need(train.sample_every >= 0, "train.sample_every", "must be >= 0 (0 = no samples)")
    need(train.sample_prompts >= 1, "train.sample_prompts", "must be >= 1")
    need(train.sample_max_new_tokens >= 1, "train.sample_max_new_tokens", "must be >= 1")
    if train.sample_every:
        need(data.eval != "", "train.sample_every", "needs data.eval: the sample prompts are its first records")
    if "lora" in config:
        need(config.lora.rank >= 0, "lora.rank", "must be >= 0 (0 = full fine-tuning)")
        need(finite("lora.alpha") > 0, "lora.alpha", "must be > 0")
        need(0.0 <= config.lora.get("dropout", 0.0) < 1.0, "lora.dropout", "must be in [0, 1)")
        need(config.lora.rank > 0 or not config.lora.init_from, "lora.init_from",
             "needs lora.rank > 0 (set it to the adapter's r)")
        from jaxft.models.quantize import QUANTIZATIONS  # jax-free until a config uses lora.*

        quantization = config.lora.get("base_quantization", "none")
        need(quantization in QUANTIZATIONS, "lora.base_quantization", f"must be one of {', '.join(QUANTIZATIONS)}")
        need(config.lora.rank > 0 or quantization == "none", "lora.base_quantization",
             "quantizes a frozen base: needs lora.rank > 0 (full fine-tuning trains every weight)")


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The locked config `jaxft sft|dpo --config SPEC --config.KEY=VALUE ...` builds.

    spec: "path/to/file.py" or "path/to/file.py:ARG"; the file's `get_config(ARG)` (or
      `get_config()` without an ARG) is called, as ml_collections' config_flags does.
    overrides: {"train.steps": 100, "optim.lr": "1e-5", ...}: dotted keys of existing fields;
      strings are parsed as the command line parses them when the field is not a string. A key
      that does not exist is an error naming it (with ml_collections' "did you mean").
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} not found (spec {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"jaxft_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    call = f"get_config({arg!r})" if arg else "get_config()"
    try:  # a mistake in the file (or its own ValueError, an unknown preset): its line, no traceback
        module_spec.loader.exec_module(module)
        if callable(getattr(module, "get_config", None)):
            config = module.get_config(arg) if arg else module.get_config()
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"config file {path}: {config_file_error(err, file)}") from err
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path}: has no get_config() function: a config file defines "
                         "get_config(arg=None) returning jaxft.config.base_config() with its changes")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config file {path}: {call} returned {type(config).__name__}, not the "
                         "ml_collections.ConfigDict of jaxft.config.base_config()")
    apply_overrides(config, overrides or {})
    config.lock()
    return config


def config_file_error(err: BaseException, path: str | Path) -> str:
    """"line N: NameError: ..." for an exception raised while running config file `path` (its
    last line in the traceback, or a SyntaxError's own line)."""
    import traceback

    file = Path(path).absolute()
    if isinstance(err, SyntaxError) and err.filename and Path(err.filename).absolute() != file:
        # a module the config file imports: the file's import line, and where the mistake is
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).absolute() == file]
        line, message = (frames[-1].lineno if frames else None), f"{err.msg} ({err.filename} line {err.lineno})"
    elif isinstance(err, SyntaxError):
        line, message = err.lineno, err.msg
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).absolute() == file]
        line, message = (frames[-1].lineno if frames else None), str(err)
    return f"{f'line {line}: ' if line else ''}{type(err).__name__}: {' '.join(str(message).split())}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets each dotted key of `overrides` (see `load`) in place; a key given without its rival
    clears the rival (`clear_rivals`)."""
    for key, value in overrides.items():
        _override(config, key, value)
    clear_rivals(config, overrides)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    parts = key.split(".")
    parent = node = config
    for part in parts:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ValueError(f"config key {key!r} does not exist{hint}")
        parent, node = node, node[part]
    if isinstance(value, str) and not isinstance(node, str):
        value = _parse(value, node, key)
    setattr(parent, parts[-1], value)


def _parse(text: str, current: Any, key: str) -> Any:
    """A command-line string as the type of the field it sets."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config key {key}: {text!r} is not a boolean (true / false)")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key}: cannot parse {text!r} as {type(current).__name__}") from None


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
