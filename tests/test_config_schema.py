"""The typed config: one schema (jaxft.config.schema) that base_config, the key table and the type
checks all come from; an older run's saved config upgraded in one step; the CLI running a config
file once."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from jaxft import cli, config as config_lib
from jaxft.errors import ConfigError
from jaxft.io import checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT = str(CONFIGS / "sft.py")


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_base_config_and_the_key_table_are_the_schema():
    base = dict(_flat(config_lib.base_config().to_dict()))
    table = config_lib.key_table()
    assert sorted(row["key"] for row in table) == sorted(base)  # every key, once
    for row in table:
        value = base[row["key"]]
        assert row["default"] == value and type(value).__name__ == row["type"], row
        assert row["doc"].strip() and "\n" not in row["doc"], row
    assert config_lib.Config().to_dict() == config_lib.base_config().to_dict()
    assert config_lib.typed(config_lib.base_config()) == config_lib.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config_lib.Config().train.steps = 3  # read-only: a ConfigDict is what users change


def test_a_wrong_type_at_the_edge_names_the_key():
    with pytest.raises(ConfigError, match=r"config key train\.steps: must be a whole number \(int\).*got '100'"):
        config_lib.from_dict({"train": {"steps": "100"}})
    with pytest.raises(ConfigError, match=r"config key data\.packing: must be true or false"):
        config_lib.from_dict({"data": {"packing": 1}})
    with pytest.raises(ConfigError, match=r"config key 'train\.stpes' does not exist\. Did you mean \"steps\""):
        config_lib.from_dict({"train": {"stpes": 1}})
    assert config_lib.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0  # an int is a float
    with pytest.raises(ConfigError, match=r"config key train\.steps: must be a whole number.*got 2\.5"):
        config_lib.load(SFT, {"train.steps": 2.5})
    notebook = config_lib.load(f"{SFT}:tiny")
    notebook.train.steps = None  # a locked ConfigDict takes None for any key
    with pytest.raises(ConfigError, match=r"config key train\.steps: .*got None"):
        config_lib.validate(notebook)
    typed = config_lib.validate(config_lib.load(f"{SFT}:tiny"))
    assert isinstance(typed, config_lib.Config) and typed.train.steps == 250


def test_a_config_file_that_adds_a_key_is_refused_naming_it(tmp_path):
    file = tmp_path / "typo.py"
    file.write_text("from jaxft.config import base_config\n\ndef get_config():\n"
                    "    c = base_config()\n    c.model.preset = 'tiny'\n    c.data.train = 'x.jsonl'\n"
                    "    c.train.steps = 1\n    c.train.stpes = 100\n    return c\n")
    with pytest.raises(ConfigError, match=r"'train\.stpes' does not exist\. Did you mean \"steps\""):
        config_lib.validate(config_lib.load(str(file)))


def test_an_old_saved_config_upgrades_and_resumes_cleanly(tmp_path):
    now = config_lib.load(f"{SFT}:tiny")
    old = json.loads(config_lib.to_json(now))
    del old["lora"]  # before LoRA
    for section, key in [("mesh", "sequence"), ("model", "attention"), ("model", "scan_layers"),
                         ("data", "streaming"), ("data", "cache_dir"), ("data", "num_proc"),
                         ("train", "wandb_project")]:
        del old[section][key]
    old["model"]["remat"] = False  # a bool before the remat policies
    (tmp_path / "config.json").write_text(json.dumps(old))

    saved = checkpoint.read_config(tmp_path)
    upgraded = config_lib.upgrade(saved)
    assert upgraded["model"]["scan_layers"] is False  # what runs before the key did: unstacked layers
    assert upgraded["model"]["remat"] == "none" and upgraded["lora"]["rank"] == 0
    assert upgraded["mesh"]["sequence"] == 1 and upgraded["data"]["streaming"] is False
    assert config_lib.upgrade(now.to_dict()) == now.to_dict()  # a current config is its own upgrade
    typed = config_lib.from_saved(saved, "W/config.json")
    assert typed.lora.base_quantization == "none" and typed.train.wandb_project == "jaxft"

    checkpoint.check_resumable(saved, now.to_dict(), tmp_path)  # no error: lora.* was full fine-tuning
    assert checkpoint.changed_keys(saved, now.to_dict(), checkpoint.RESUME_KEYS) == []
    assert checkpoint.changed_keys(saved, now.to_dict(), ["model.scan_layers"]) == [
        "model.scan_layers: checkpoint False -> now True"]
    with pytest.raises(ConfigError, match=r"W/config\.json: config key train\.steps: must be a whole number"):
        config_lib.from_saved({**old, "train": {**old["train"], "steps": "ten"}}, "W/config.json")


def test_the_cli_runs_a_config_file_once(tmp_path):
    counter = tmp_path / "runs.txt"
    file = tmp_path / "counted.py"
    file.write_text("from jaxft.config import base_config\n"
                    f"with open({str(counter)!r}, 'a') as f:\n    f.write('x')\n\n"
                    "def get_config(arg=None):\n    c = base_config()\n    c.train.steps = 100\n    return c\n")
    flags = ["--config", str(file), "--config.train.epochs", "2", "--config.data.packing",
             "--config.mesh.data", "-1", "--config.optim.lr=1e-4"]
    config = cli._config_flags(flags, "jaxft sft", workdir=False).config
    assert counter.read_text() == "x"  # one run of the file (it used to run twice: a check, then absl's parse)
    assert (config.train.steps, config.train.epochs, config.data.packing) == (0, 2.0, True)  # rival cleared
    assert math.isclose(config.optim.lr, 1e-4) and config.is_locked
    assert config.to_dict() == config_lib.load(str(file), {"train.epochs": 2, "data.packing": True,
                                                           "optim.lr": 1e-4}).to_dict()
    for argv, says in [(["--config", str(file), "--config.train.steps=many"],
                        "jaxft sft: --config.train.steps=many: config key train.steps: cannot parse 'many' as int"),
                       (["--config", str(file), "--config.train.steps"],
                        "jaxft sft: --config.train.steps: needs a value: --config.train.steps=VALUE"),
                       (["--config", str(file), "--confg.train.steps=1"], "jaxft sft: unknown flag '--confg.train"),
                       (["--config.train.steps=1"], "jaxft sft: --config is required")]:
        with pytest.raises(SystemExit) as err:
            cli._config_flags(argv, "jaxft sft", workdir=False)
        assert str(err.value).startswith(says), err.value
