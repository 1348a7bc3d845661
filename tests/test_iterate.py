"""`jaxft iterate`: rounds of sample, score, pair, DPO on a tiny model; files, resume, errors."""

import json
from pathlib import Path

import pytest

from jaxft.config import load
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.errors import ConfigError
from jaxft.iterate import rounds as rounds_lib
from tests.quickstart_subset import quickstart_head, tiny_model_folder

CONFIG = str(Path(__file__).parents[1] / "configs" / "iterate.py")
# A random model never answers right: the length term makes samples differ so pairs exist.
REWARDS = '[{"kind": "answer"}, {"kind": "length", "max_words": 2, "weight": 0.1}]'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iterate")
    tiny_model_folder(tmp / "start")
    overrides = {"model.path": str(tmp / "start"), "iterate.prompts": str(quickstart_head(tmp, "sft_train.jsonl", 6)),
                 "iterate.eval_prompts": str(quickstart_head(tmp, "sft_eval.jsonl", 4)), "iterate.rounds": 2,
                 "iterate.samples": 3, "iterate.max_new_tokens": 6, "iterate.rewards": REWARDS,
                 "train.steps": 2, "train.batch_size": 4, "optim.warmup_steps": 0, "data.max_length": 64}
    config = load(f"{CONFIG}:tiny", overrides)
    rows = rounds_lib.iterate(config, tmp / "run", log=lambda *a: None)
    return tmp, config, rows


def test_rounds_write_samples_pairs_runs_and_the_final_export(setup):
    tmp, _, rows = setup
    run = tmp / "run"
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((run / "rounds.json").read_text()) == rows
    for r in (1, 2):
        lines = [json.loads(line) for line in (run / f"round_{r}" / "samples.jsonl").read_text().splitlines()]
        assert len(lines) == 6 and all(len(line["completions"]) == 3 for line in lines)
        assert set(lines[0]["rewards"]) == {"reward", "reward/answer", "reward/length"}
        counts = json.loads((run / f"round_{r}" / "pairs.json").read_text())
        pairs = (run / f"round_{r}" / "pairs.jsonl").read_text().splitlines()
        assert counts["pairs"] == len(pairs) > 0 and counts["pairs"] + counts["dropped_ties"] == 6
        first = json.loads(pairs[0])
        assert first["chosen_reward"] > first["rejected_reward"]
        assert first["chosen"][0]["role"] == "assistant"  # the conversational prompt's form
        assert rows[r]["pairs"] == counts["pairs"] and "eval_reward" in rows[r]
        assert (run / f"round_{r}" / "train" / "metrics.jsonl").exists()
    # Round 2 started from round 1's export; the final policy is round 2's.
    saved = json.loads((run / "round_2" / "train" / "config.json").read_text())
    assert saved["model"]["path"] == str(run / "round_1" / "train" / "hf")
    assert (run / "hf" / "config.json").read_bytes() == (run / "round_2" / "train" / "hf" / "config.json").read_bytes()


def test_a_rerun_resumes_from_the_files(setup, monkeypatch):
    tmp, config, rows = setup
    import jaxft.inference.completions

    monkeypatch.setattr(jaxft.inference.completions, "sample_completions", lambda *a, **k: pytest.fail("sampled again"))
    again = rounds_lib.iterate(config, tmp / "run", log=lambda *a: None)
    assert [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in again] == \
        [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def test_sampling_continues_a_partial_file_to_the_same_samples(setup, tmp_path, monkeypatch):
    tmp, config, _ = setup
    full = (tmp / "run" / "round_1" / "samples.jsonl").read_text().splitlines()
    out = tmp_path / "samples.jsonl"
    # Killed after two prompts, mid-way through writing the third.
    (tmp_path / "samples.partial.jsonl").write_text("\n".join(full[:2]) + "\n" + full[2][:20])
    monkeypatch.setattr(rounds_lib, "SAMPLE_CHUNK", 2)
    from jaxft.config import typed
    from jaxft.rewards import make_reward, parse_rewards

    it = typed(config).iterate
    prompts = rounds_lib.read_prompt_records(it.prompts, "iterate.prompts")
    lines = rounds_lib.sample_and_score(tmp / "start", rounds_lib.round_prompts(prompts, it, 1), out, it,
                                        make_reward(parse_rewards(it.rewards)), seed=typed(config).train.seed + 1000,
                                        batch_size=2, log=lambda *a: None)
    assert out.read_text().splitlines() == full and len(lines) == 6
    assert not (tmp_path / "samples.partial.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ({"iterate.prompts": ""}, "iterate.prompts: the prompt records"),
    ({"iterate.samples": 1}, "iterate.samples must be >= 2"),
    ({"iterate.rounds": 0}, "iterate.rounds must be >= 1"),
    ({"iterate.prompts_per_round": -1}, "iterate.prompts_per_round must be >= 0"),
    ({"iterate.temperature": 0.0}, "iterate.temperature must be > 0"),
    ({"iterate.top_p": 0.0}, r"iterate.top_p in \(0, 1\]"),
    ({"iterate.max_new_tokens": 0}, "iterate.max_new_tokens >= 1"),
    ({"iterate.pairs": "all"}, "iterate.pairs must be one of best_worst, sft"),
    ({"iterate.pairs_per_prompt": 0}, "iterate.pairs_per_prompt must be >= 1"),
    ({"iterate.rewards": "answer,nope"}, "unknown reward kind 'nope'"),
    ({"iterate.rewards": "answer:x"}, "the weight after ':' must be a number"),
    ({"lora.rank": 4, "lora.base_quantization": "nf4"}, "lora.base_quantization: a QLoRA run exports no full model"),
])
def test_config_errors_name_the_key(override, message, tmp_path):
    config = load(f"{CONFIG}:tiny", {"model.path": str(tmp_path), "iterate.prompts": "p.jsonl", **override})
    with pytest.raises(ConfigError, match=message):
        rounds_lib.check_iterate_config(config)


def test_rejection_sampling_rounds_train_on_the_best_samples_only(tmp_path):
    """pairs=sft: the round's run is an SFT run on the pairs file, whose trained tokens are the
    best sample of each prompt (and its EOS), nothing of the others."""
    from jaxft.data.tokenize import load_examples
    from jaxft.iterate.pairs import build_pairs

    config = load(f"{CONFIG}:tiny", {"model.path": str(tmp_path), "iterate.prompts": "p.jsonl",
                                     "iterate.pairs": "sft"})
    from jaxft.config import typed

    it = typed(config).iterate
    records = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
               {"prompt": "What is 1 + 1?", "answer": "2"}]
    completions = [["2 + 3 = 6.", "2 + 3 = 5. The answer is 5.", "5 5 5 5"], ["1 + 1 = 2.", "3", "2 2"]]
    rewards = [[0.0, 1.0, 0.2], [1.0, 0.0, 0.5]]
    best, _ = build_pairs(records, completions, rewards, mode=it.pairs)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in best))
    round_run = rounds_lib.round_config(config, it, pairs_file=pairs_file, policy="/p", start="/s")
    assert rounds_lib.round_kind(it) == "sft" and round_run.data.train == str(pairs_file)
    assert round_run.model.path == "/p"
    tok = load_bundled_tokenizer()
    examples = load_examples(str(pairs_file), tok, kind="sft", max_length=64).examples
    trained = [tok.decode([t for t, m in zip(e.input_ids[1:], e.loss_mask[1:]) if m]) for e in examples]
    assert [t.replace(tok.eos_token, "").strip() for t in trained] == ["2 + 3 = 5. The answer is 5.", "1 + 1 = 2."]
