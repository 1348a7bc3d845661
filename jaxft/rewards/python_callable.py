"""A reward given as `module:function`, called as TRL calls reward functions."""

from __future__ import annotations

import importlib

import numpy as np

from jaxft.errors import ConfigError
from jaxft.rewards import register


def load_function(path: str):
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"reward 'python': function must be 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward 'python': cannot import {module_name!r} ({err}); put it on PYTHONPATH") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward 'python': {module_name} has no function {name!r}")
    return fn


@register("python")
def python(function: str):
    fn = load_function(function)

    def reward(records, completions):
        P, K = len(records), len(completions[0]) if completions else 0
        flat_records = [r for r in records for _ in range(K)]
        fields = {key for r in records for key in r if key not in ("prompt", "completions")}
        columns = {key: [r.get(key) for r in flat_records] for key in sorted(fields)}
        prompts = [r.get("prompt", r.get("messages")) for r in flat_records]
        values = fn(prompts=prompts, completions=[c for row in completions for c in row], **columns)
        values = np.asarray([np.nan if v is None else v for v in values], np.float64)
        if values.shape != (P * K,):
            raise ValueError(f"reward {function} returned {values.shape[0] if values.ndim else 'a scalar'} values "
                             f"for {P * K} completions; it must return one float per completion")
        if np.isnan(values).any():
            raise ValueError(f"reward {function} returned None / NaN for completion "
                             f"{int(np.flatnonzero(np.isnan(values))[0])}; return a float for every one")
        return values.reshape(P, K)

    return reward
