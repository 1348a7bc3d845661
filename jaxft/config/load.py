"""Building a config the way the CLI does: `load` runs a config file once and applies the
user's overrides (--config.KEY=VALUE, `load(overrides=...)`, a sweep's), rival keys (RIVALS)
included; `to_json` / `from_json` for the saved WORKDIR/config.json."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_collections

from jaxft.config.schema import Config, check_type
from jaxft.config.upgrade import upgrade
from jaxft.errors import ConfigError, PathError


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
            set_key(config, _RIVAL[key], 0)


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


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The locked config `jaxft sft|dpo --config SPEC --config.KEY=VALUE ...` builds.

    spec: "path/to/file.py" or "path/to/file.py:ARG"; the file's `get_config(ARG)` (or
      `get_config()` without an ARG) is called, as ml_collections' config_flags does.
    overrides: {"train.steps": 100, "optim.lr": "1e-5", ...}: dotted keys of existing fields;
      strings are parsed as the command line parses them when the field is not a string. A key
      that does not exist is an error naming it (with a "did you mean").
    """
    config = load_file(spec)
    apply_overrides(config, overrides or {})
    config.lock()
    return config


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict config file `spec` ("FILE[:ARG]") returns, the file run once (see `load`).
    PathError (an OSError) when it is missing; ConfigError, "config file FILE: line N: NameError: ...",
    when running it fails or it returns no ConfigDict."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise PathError(f"config file {path!r} not found (spec {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"jaxft_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    call = f"get_config({arg!r})" if arg else "get_config()"
    try:  # a mistake in the file (or its own ValueError, an unknown preset): its line, no traceback
        module_spec.loader.exec_module(module)
        if callable(getattr(module, "get_config", None)):
            config = module.get_config(arg) if arg else module.get_config()
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"config file {path}: {config_file_error(err, file)}") from err
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path}: has no get_config() function: a config file defines "
                          "get_config(arg=None) returning jaxft.config.base_config() with its changes")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: {call} returned {type(config).__name__}, not the "
                          "ml_collections.ConfigDict of jaxft.config.base_config()")
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
        set_key(config, key, value)
    clear_rivals(config, overrides)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets dotted `key` of `config` to `value` (a string parsed as the command line parses it
    when the key is not a string); ConfigError naming the key when it does not exist or the
    value has the wrong type. (Rivals: `apply_overrides`, `clear_rivals`.)"""
    parts = key.split(".")
    parent = node = config
    for part in parts:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f'. Did you mean "{close[0]}"?' if close else ""
            raise ConfigError(f"config key {key!r} does not exist{hint}")
        parent, node = node, node[part]
    if isinstance(value, str) and not isinstance(node, str):
        value = _parse(value, node, key)
    kind = type(node)
    if kind in (int, float, str, bool) and value is not None:
        value = check_type(key, value, kind)  # a wrong type named by its key, not ml_collections' TypeError
    setattr(parent, parts[-1], value)


def _parse(text: str, current: Any, key: str) -> Any:
    """A command-line string as the type of the field it sets."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key}: {text!r} is not a boolean (true / false)")
    if isinstance(current, (int, float)):
        try:
            return type(current)(text.strip())
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key}: cannot parse {text!r} as {type(current).__name__}") from None


def to_json(config) -> str:
    """The saved WORKDIR/config.json of `config` (a ConfigDict or a Config)."""
    if isinstance(config, Config):
        return json.dumps(config.to_dict(), indent=2, sort_keys=True)
    return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A saved config.json as a ConfigDict, upgraded (`jaxft.config.upgrade`): every key there."""
    return ml_collections.ConfigDict(upgrade(json.loads(text)))
