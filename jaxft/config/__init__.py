"""The config: every key with its type, default and doc (`schema`), start-up validation with clear
errors (`validate`), `load`, which builds a config from a file the way the CLI does, and the
upgrade of an older run's saved config (`upgrade`).

Config files under `configs/` start from `base_config()` and change what their recipe needs.
The returned ConfigDict is locked: setting a key that does not exist (a typo on the command
line, `--config.optim.lrr=1e-5`) fails at start-up instead of being silently ignored.

In a notebook:

    config = jaxft.config.load("configs/sft.py:tiny", overrides={"train.steps": 100})
    config.train.steps = 200         # a ConfigDict: change it before jaxft.run
    typed = jaxft.config.validate(config)   # the frozen, typed Config: typed.train.steps

Some keys say one thing two ways (RIVALS): train.steps or train.epochs, optim.warmup_steps or
optim.warmup_ratio. The step count wins when both are set, and the one the user gives
(--config.KEY, `load(overrides=...)`, a sweep) is the one that counts: `--config.train.epochs=2`
on a preset that fixes train.steps trains 2 epochs.
"""

from jaxft.config.load import (RIVALS, apply_overrides, clear_rivals, config_file_error, from_json, load,
                               load_file, lock, merge_overrides, set_key, to_json)
from jaxft.config.schema import (Config, DataSection, DpoSection, LoraSection, MeshSection, ModelSection,
                                 OptimSection, TrainSection, base_config, from_dict, key_table, section_docs,
                                 typed)
from jaxft.config.upgrade import from_saved, upgrade
from jaxft.config.validate import validate

__all__ = ["RIVALS", "Config", "DataSection", "DpoSection", "LoraSection", "MeshSection", "ModelSection",
           "OptimSection", "TrainSection", "apply_overrides", "base_config", "clear_rivals", "config_file_error",
           "from_dict", "from_json", "from_saved", "key_table", "load", "load_file", "lock", "merge_overrides",
           "section_docs", "set_key", "to_json", "typed", "upgrade", "validate"]
