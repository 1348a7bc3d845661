"""Configs as users meet them: `jaxft.config.load` equals the CLI's config, overrides are
checked, and a config file without a preset is the recipe for a real model."""

import math
from pathlib import Path

import pytest

from jaxft import cli, config as config_lib
from jaxft.steps.optimizer import warmup_steps_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT, DPO = str(CONFIGS / "sft.py"), str(CONFIGS / "dpo.py")


@pytest.mark.parametrize("spec,overrides", [
    (f"{SFT}:tiny", {"train.steps": "100", "optim.lr": "1e-4", "data.packing": "false"}),
    (SFT, {"model.path": "/models/llama", "data.train": "a.jsonl=0.3,b.jsonl=0.7"}),
    (f"{DPO}:tiny", {"dpo.loss_type": "ipo", "dpo.beta": "0.5"}),
])
def test_load_equals_the_cli_config(spec, overrides):
    flags = [f"--config={spec}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    from_cli = cli._config_flags(flags, "jaxft sft", workdir=False).config
    loaded = config_lib.load(spec, overrides)
    assert loaded.to_dict() == from_cli.to_dict()
    assert loaded.is_locked


def test_overrides_take_python_values_and_refuse_unknown_keys():
    config = config_lib.load(f"{SFT}:tiny", {"train.steps": 7, "optim.lr": 1e-3, "data.packing": False})
    assert (config.train.steps, config.optim.lr, config.data.packing) == (7, 1e-3, False)
    with pytest.raises(ValueError, match=r"'optim\.lrr' does not exist; did you mean \"lr\""):
        config_lib.load(SFT, {"optim.lrr": 1e-5})
    with pytest.raises(ValueError, match=r"'optm\.lr' does not exist; did you mean \"optim\""):
        config_lib.load(SFT, {"optm.lr": 1e-5})
    with pytest.raises(ValueError, match=r"train\.steps: cannot parse 'many'"):
        config_lib.load(SFT, {"train.steps": "many"})
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        config_lib.load("configs/nope.py:tiny")
    with pytest.raises(ValueError, match="unknown preset 'llama9'"):
        config_lib.load(f"{SFT}:llama9")


def test_sft_without_a_preset_is_the_recipe_for_your_own_model():
    config = config_lib.load(SFT, {"model.path": "/models/mine", "data.train": "train.jsonl"})
    assert config.optim.lr == 2e-5 and config.optim.schedule == "cosine"
    assert config.data.eval == "" and config.model.preset == ""  # no bundled data or model
    assert warmup_steps_of(config.optim, 1000) == 30  # 3% warmup, as TRL recipes use
    config_lib.validate(config)
    with pytest.raises(ValueError, match=r"config key model\.path: no model; set --config\.model\.path"):
        config_lib.validate(config_lib.load(SFT, {"data.train": "train.jsonl"}))
    tiny = config_lib.load(f"{SFT}:tiny")  # the bundled demo is only :tiny
    assert tiny.model.preset == "tiny" and tiny.data.eval.endswith("sft_eval.jsonl")


def test_dpo_without_a_preset_is_plain_dpo():
    config = config_lib.load(DPO, {"model.path": "/models/sft", "data.train": "pairs.jsonl"})
    assert config.dpo.loss_type == "sigmoid" and config.dpo.loss_weights == ""  # no NLL term
    assert config.dpo.beta == 0.1 and 5e-7 <= config.optim.lr <= 1e-6
    assert config.dpo.reference == "policy" and config.data.eval == ""


def test_warmup_steps_win_over_the_ratio():
    config = config_lib.load(SFT, {"optim.warmup_ratio": 0.1, "optim.warmup_steps": 5})
    assert warmup_steps_of(config.optim, 1000) == 5
    config = config_lib.load(SFT, {"optim.warmup_ratio": 0.1})
    assert warmup_steps_of(config.optim, 1000) == 100
    with pytest.raises(ValueError, match=r"optim\.warmup_ratio: must be in \[0, 1\)"):
        config_lib.validate(config_lib.load(SFT, {"model.path": "m", "data.train": "t", "optim.warmup_ratio": 1.5}))
    assert math.isclose(config_lib.load(DPO).optim.warmup_ratio, 0.1)


@pytest.mark.parametrize("path", sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.py")), ids=str)
def test_every_shipped_config_file_loads(path, tmp_path):
    """configs/ are the examples users copy: each loads as the README runs it (the quickstart
    stage points at a quickstart workdir; sweep files also give their runs)."""
    arg = {"quickstart.py": str(tmp_path)}.get(str(path), "tiny" if path.parent == Path(".") else "")
    spec = f"{CONFIGS / path}:{arg}" if arg else str(CONFIGS / path)
    config = config_lib.load(spec)
    assert config.is_locked and config.train.batch_size > 0
    if path.name == "quickstart.py":
        assert config.model.path == str(tmp_path / "base")
