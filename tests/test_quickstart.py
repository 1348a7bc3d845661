"""The quickstart's story on a shorter schedule, through README's first command (`jaxft
quickstart`): SFT raises exact match over the random base model; DPO raises preference
accuracy and lowers the repetition ratio relative to SFT.

(README.md and docs/quickstart.md report the full schedule, `jaxft quickstart`: 400 SFT + 150 DPO
steps.)
"""

import json

from jaxft import cli
from jaxft.quickstart.pipeline import format_table


def test_quickstart_story_holds_on_a_short_schedule(tmp_path, capsys):
    cli.main(["quickstart", "--workdir", str(tmp_path), "--sft-steps", "200", "--dpo-steps", "80",
              "--questions", "100"])
    results = json.loads((tmp_path / "results.json").read_text())
    base, sft, dpo = results["base"], results["sft"], results["dpo"]
    assert base["exact_match"] < 0.05  # a random model's output rarely holds the right number
    assert sft["exact_match"] > base["exact_match"] + 0.15
    assert sft["repetition_ratio"] > 0.02  # the repetitive tails of the SFT data were learned
    assert dpo["repetition_ratio"] < sft["repetition_ratio"]
    assert dpo["preference_accuracy"] > sft["preference_accuracy"]
    assert dpo["exact_match"] > base["exact_match"] + 0.15
    assert (tmp_path / "dpo" / "hf" / "model.safetensors").is_file()
    assert format_table(results) in capsys.readouterr().out  # the table the command prints
