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
    with pytest.raises(ValueError, match=r"'optim\.lrr' does not exist\. Did you mean \"lr\""):
        config_lib.load(SFT, {"optim.lrr": 1e-5})
    with pytest.raises(ValueError, match=r"'optm\.lr' does not exist\. Did you mean \"optim\""):
        config_lib.load(SFT, {"optm.lr": 1e-5})
    with pytest.raises(ValueError, match=r"train\.steps: cannot parse 'many'"):
        config_lib.load(SFT, {"train.steps": "many"})
    with pytest.raises(OSError, match="configs/nope.py"):
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
    """configs/ are the examples users copy: each loads as the docs run it (the quickstart
    stage points at a quickstart workdir; sweep files also give their runs)."""
    arg = {"quickstart.py": str(tmp_path)}.get(str(path), "tiny" if path.parent == Path(".") else "")
    spec = f"{CONFIGS / path}:{arg}" if arg else str(CONFIGS / path)
    config = config_lib.load(spec)
    assert config.is_locked and config.train.batch_size > 0
    assert config_lib.typed(config).to_dict() == config.to_dict()  # every key known, of its type
    if path.name == "quickstart.py":
        assert config.model.path == str(tmp_path / "base")


# --- the run's length and warmup: the key the user gives counts ----------------------------------


class _Data:
    """What `total_steps` reads of the training data: its batches per epoch."""

    def batches_per_epoch(self) -> int:
        return 25


def _cli(spec, **overrides):
    """The config `jaxft sft --config SPEC --config.KEY=VALUE ...` builds."""
    flags = [f"--config={spec}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    return cli._config_flags(flags, "jaxft sft", workdir=False).config


def _length(config):
    from jaxft.run import run_length

    return run_length(config, _Data())


def test_an_explicit_train_steps_wins_over_the_recipes_epochs():
    # The presetless recipes train 3 (SFT) / 1 (DPO) epochs; TRL's max_steps overrides them.
    for config in (config_lib.load(SFT, {"train.steps": 20}), _cli(SFT, **{"train.steps": 20}),
                   config_lib.load(DPO, {"train.steps": "20"})):
        assert _length(config) == (20, "20 steps (train.steps)")
    notebook = config_lib.load(SFT)
    notebook.train.steps = 20  # set in Python, not as an override: the step count still wins
    assert _length(notebook) == (20, "20 steps (train.steps; train.epochs=3 ignored)")


def test_without_an_explicit_length_the_recipe_trains_its_epochs():
    assert _length(config_lib.load(SFT)) == (75, "75 steps = 3 epochs x 25 batches (train.epochs)")
    assert _length(_cli(SFT, **{"optim.lr": "1e-5"}))[0] == 75
    assert _length(config_lib.load(DPO))[0] == 25
    assert _length(config_lib.load(f"{SFT}:deepseek_llm_67b"))[0] == 50
    # steps=0 given by the user means "not given": the recipe's epochs stay.
    assert _length(config_lib.load(SFT, {"train.steps": 0}))[0] == 75


def test_explicit_epochs_take_effect_on_a_preset_that_fixes_the_steps():
    assert _length(config_lib.load(f"{SFT}:tiny"))[0] == 250
    for config in (config_lib.load(f"{SFT}:tiny", {"train.epochs": 2.0}), _cli(f"{SFT}:tiny", **{"train.epochs": 2})):
        assert config.train.steps == 0  # config.json says what the run did
        assert _length(config) == (50, "50 steps = 2 epochs x 25 batches (train.epochs)")
    # Both given: the step count wins, as TRL's max_steps over num_train_epochs.
    assert _length(config_lib.load(f"{SFT}:tiny", {"train.epochs": 2.0, "train.steps": 7}))[0] == 7


def test_a_sweep_runs_own_key_beats_a_rival_given_to_every_run():
    from jaxft import sweep

    runs = sweep.grid({"train.epochs": [2.0]}, kind="sft", config=f"{SFT}:tiny", overrides={"train.steps": "10"})
    assert _length(config_lib.load(runs[0].config, runs[0].overrides))[0] == 50
    assert config_lib.merge_overrides({"train.steps": 10, "optim.lr": 1e-4}, {"train.epochs": 2.0}) == {
        "optim.lr": 1e-4, "train.epochs": 2.0}


def test_an_explicit_warmup_ratio_takes_effect_on_a_preset_with_warmup_steps():
    assert warmup_steps_of(config_lib.load(f"{SFT}:tiny").optim, 250) == 20
    for config in (config_lib.load(f"{SFT}:tiny", {"optim.warmup_ratio": 0.1}),
                   _cli(f"{SFT}:tiny", **{"optim.warmup_ratio": 0.1})):
        assert config.optim.warmup_steps == 0 and warmup_steps_of(config.optim, 250) == 25
    # ...and explicit warmup_steps on the recipe's 3% ratio.
    assert warmup_steps_of(_cli(SFT, **{"optim.warmup_steps": 5}).optim, 1000) == 5


def test_streaming_needs_train_steps_and_says_so():
    streaming = {"model.path": "m", "data.train": "t.jsonl", "data.streaming": True}
    with pytest.raises(ValueError, match=r"train\.steps: must be > 0 with data\.streaming=True"):
        config_lib.validate(config_lib.load(SFT, streaming))
    config = config_lib.load(SFT, {**streaming, "train.steps": 100})
    config_lib.validate(config)
    assert config.train.epochs == 0  # the streaming pipeline refuses a config with epochs
