"""Rewards (jaxft.rewards) and the records built from scored samples (jaxft.iterate.pairs)."""

import sys
import textwrap

import numpy as np
import pytest

from jaxft.errors import ConfigError
from jaxft.iterate.pairs import build_pairs
from jaxft.rewards import make_reward

RECORDS = [{"prompt": "What is 2 + 3?", "answer": "5"},
           {"messages": [{"role": "user", "content": "Natalia sold 48 clips..."},
                         {"role": "assistant", "content": "She sold 72. #### 72"}],
            "answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}]
COMPLETIONS = [["The answer is 5.", "2 + 3 = 6", "5 5 5 5 5 5 5"],
               ["She sold \\boxed{72} clips", "72 then 48", "The answer is 1,000."]]


def test_answer_reward_reads_final_answers_and_gsm8k_references():
    got = make_reward("answer")(RECORDS, COMPLETIONS)
    # "The answer is" first; \boxed{}; else the last number; GSM8K's "#### 72" is the reference.
    np.testing.assert_array_equal(got["reward"], [[1, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(got["reward/answer"], got["reward"])


def test_weighted_sum_of_kinds_and_each_term():
    reward = make_reward([{"kind": "answer", "weight": 2.0}, {"kind": "repetition", "weight": 1.0},
                          {"kind": "regex", "pattern": r"The answer is", "weight": 0.5},
                          {"kind": "length", "max_words": 4, "weight": 1.0}])
    got = reward(RECORDS, COMPLETIONS)
    # "5 5 5 5 5 5 5": word 3-grams 5 of them, 4 repeats -> -0.8; 7 words past 4 -> -3/4.
    assert got["reward/repetition"][0, 2] == pytest.approx(-0.8)
    assert got["reward/length"][0, 2] == pytest.approx(-0.75)
    np.testing.assert_array_equal(got["reward/regex"], [[1, 0, 0], [0, 0, 1]])
    expected = 2 * got["reward/answer"] + got["reward/repetition"] + 0.5 * got["reward/regex"] + got["reward/length"]
    np.testing.assert_allclose(got["reward"], expected)
    assert got["reward"][0, 0] == pytest.approx(2 + 0.5)


def test_python_reward_is_called_trl_style(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def count_chars(prompts, completions, answer, **fields):
            return [len(c) + (100 if a == "5" else 0) for c, a in zip(completions, answer)]
        def too_few(prompts, completions, **fields):
            return [1.0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    got = make_reward({"kind": "python", "function": "my_rewards:count_chars"})(RECORDS, COMPLETIONS)
    np.testing.assert_array_equal(got["reward"][0], [116, 109, 113])
    assert got["reward"][1, 0] == len(COMPLETIONS[1][0])
    with pytest.raises(ValueError, match="return one float per completion"):
        make_reward({"kind": "python", "function": "my_rewards:too_few"})(RECORDS, COMPLETIONS)
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward kind 'nope'; known: answer"),
    ({"weight": 1.0}, "a reward is a kind name or a dict with 'kind'"),
    ({"kind": "regex"}, r"rewards\[0\] \(regex\): .*pattern"),
    ({"kind": "regex", "pattern": "("}, "does not compile"),
    ({"kind": "python", "function": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz'"),
    ({"kind": "python", "function": "os"}, "must be 'module:function'"),
])
def test_bad_reward_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_reward(spec)


def test_best_worst_pairs_drop_ties_and_small_margins():
    rewards = np.array([[1.0, 0.0, 0.5], [0.3, 0.3, 0.3], [0.2, 0.1, 0.2]])
    records = RECORDS + [{"prompt": "third"}]
    completions = COMPLETIONS + [["a", "b", "c"]]
    pairs, counts = build_pairs(records, completions, rewards, min_margin=0.15)
    assert counts == {"prompts": 3, "pairs": 1, "dropped_ties": 1, "dropped_margin": 1, "dropped_empty": 0}
    assert pairs == [{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "2 + 3 = 6",
                      "prompt_index": 0, "chosen_reward": 1.0, "rejected_reward": 0.0}]
    pairs, counts = build_pairs(records, completions, rewards)
    assert counts["pairs"] == 2 and pairs[1]["prompt_index"] == 2
    # The first of equal best rewards is chosen; a message prompt gets assistant messages.
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("a", "b")
    conversational, _ = build_pairs(RECORDS[1:], COMPLETIONS[1:], [[0.0, 1.0, 0.5]])
    assert conversational[0]["prompt"] == [RECORDS[1]["messages"][0]]  # the reference answer is dropped
    assert conversational[0]["chosen"] == [{"role": "assistant", "content": "72 then 48"}]


def test_several_pairs_a_prompt_pair_the_ith_best_with_the_ith_worst_while_the_margin_passes():
    records = [{"prompt": "p"}, {"prompt": "q"}]
    completions = [["a", "b", "c", "d", "e", "f"], ["u", "v", "w", "x", "y", "z"]]
    rewards = np.array([[1.0, 0.0, 1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    pairs, counts = build_pairs(records, completions, rewards, pairs_per_prompt=3)
    # p: three disjoint pairs (the third's margin is 0.5); q: one wrong sample, one pair
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("a", "b"), ("c", "d"), ("e", "f"), ("u", "z")]
    assert counts["pairs"] == 4
    pairs, _ = build_pairs(records, completions, rewards, pairs_per_prompt=3, min_margin=0.6)
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("a", "b"), ("c", "d"), ("u", "z")]
    pairs, _ = build_pairs(records, completions, rewards, pairs_per_prompt=2)
    assert len(pairs) == 3  # at most N a prompt
    assert build_pairs(records, completions, rewards)[0] == build_pairs(records, completions, rewards,
                                                                        pairs_per_prompt=1)[0]
    with pytest.raises(ConfigError, match="pairs_per_prompt"):
        build_pairs(records, completions, rewards, pairs_per_prompt=0)


def test_empty_completions_are_never_chosen_or_rejected():
    # The DPO / SFT loaders refuse an empty reply: an empty sample (EOS at once) is left out of the
    # choice, and a prompt left without two samples (one for sft) is dropped and counted.
    records = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    completions = [["", "x", "y", " "], ["", "only", "\n", ""], ["", "", "", ""]]
    rewards = np.array([[9.0, 1.0, 0.0, -9.0], [9.0, 1.0, 0.0, -9.0], [1.0, 0.0, 0.0, 0.0]])
    pairs, counts = build_pairs(records, completions, rewards)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "y")]
    assert (counts["pairs"], counts["dropped_empty"]) == (1, 2)
    best, counts = build_pairs(records, completions, rewards, mode="sft")
    assert [r["completion"] for r in best] == ["x", "only"] and counts["dropped_empty"] == 1


def test_sft_mode_keeps_the_best_sample_above_the_bar():
    rewards = np.array([[0.0, 2.0, 1.0], [0.5, 0.2, 0.1]])
    records, counts = build_pairs(RECORDS, COMPLETIONS, rewards, mode="sft", min_margin=1.0)
    assert counts == {"prompts": 2, "accepted": 1, "dropped_ties": 0, "dropped_margin": 1, "dropped_empty": 0}
    assert records == [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 6", "prompt_index": 0, "reward": 2.0}]
    with pytest.raises(ConfigError, match="unknown mode 'all'"):
        build_pairs(RECORDS, COMPLETIONS, rewards, mode="all")
