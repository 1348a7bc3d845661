"""Online DPO (dpo.online): a tiny random model samples pairs each step with its live params and
learns the reward; ln 2 at the first step; a stopped run resumes to the same steps; config
mistakes are named before anything runs."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft.config import load
from jaxft.errors import ConfigError
from jaxft.loop import Hook
from jaxft.run import run
from jaxft.tasks import online_dpo
from tests.quickstart_subset import quickstart_head, tiny_model_folder

CONFIG = str(Path(__file__).parents[1] / "configs" / "online_dpo.py")
STEPS, STOP_AT, RESUMED = 30, 10, 3


def digits(prompts, completions, **fields):
    """The reward the tiny model learns: the digits in a completion (a random model samples few)."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def overrides(tmp: Path) -> dict:
    return {"model.path": str(tmp / "start"), "data.train": str(tmp / "sft_train.jsonl"), "data.eval": "",
            "train.eval_benchmarks": "", "dpo.online_rewards": '[{"kind": "python", "function": '
            '"tests.test_online_dpo:digits"}]', "dpo.online_max_new_tokens": 8, "data.max_length": 64,
            "train.steps": STEPS, "train.batch_size": 8, "train.log_every": 1, "train.save_every": STOP_AT,
            "train.progress": False, "train.report_to": "none", "dpo.loss_type": "sigmoid", "dpo.loss_weights": "",
            "optim.lr": 1e-3, "optim.schedule": "constant", "optim.warmup_steps": 0}


def rows_of(result) -> list[dict]:
    return [r for r in result.metrics if "loss" in r]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted run, its sampler calls recorded (the params it was given, its options)."""
    tmp = tmp_path_factory.mktemp("online")
    tiny_model_folder(tmp / "start")
    quickstart_head(tmp, "sft_train.jsonl", 64)
    config = load(f"{CONFIG}:tiny", overrides(tmp))
    calls = []
    real = online_dpo.sample_ids

    def recording(model, prompt_ids, **kw):
        from flax import nnx

        calls.append({"leaves": jax.tree.leaves(nnx.state(model, nnx.Param)), "kw": kw})
        return real(model, prompt_ids, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(online_dpo, "sample_ids", recording)
        result = run(config, tmp / "run", kind="dpo")
    return tmp, config, rows_of(result), calls


def test_the_first_step_is_ln2_and_the_mean_reward_rises(trained):
    _, _, rows, _ = trained
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and abs(rows[0]["rewards/margins"]) < 1e-5
    scores = [r["objective/scores"] for r in rows]
    first, last = np.mean(scores[:8]), np.mean(scores[-8:])
    assert last > 2 * first + 0.2, (first, last)  # measured: 0.20 -> 0.80 digits a completion
    for r in rows:
        assert 0 <= r["objective/ties"] <= 1 and r["objective/scores_margin"] >= 0
        assert r["objective/scores/python"] == r["objective/scores"]  # one term, weight 1
        assert 1 <= r["val/completion_length"] <= 8 and 0 < r["padding_fraction"] <= 1 and r["tokens_per_sec"] >= 0


def test_the_sampler_gets_the_train_states_own_params(trained):
    """No second copy of the weights: the arrays the sampler read at a step are the train state's,
    which that step's update donated (deleted), and the scanned layers are sampled as they are."""
    _, _, _, calls = trained
    assert len(calls) == STEPS
    for call in calls[:-1]:
        assert call["kw"]["unroll"] is False and call["kw"]["samples"] == 2
        assert call["leaves"] and all(leaf.is_deleted() for leaf in call["leaves"])
    seeds = [call["kw"]["seed"] for call in calls]
    assert seeds == [online_dpo.sampling_seed(0, s) for s in range(STEPS)]


def test_a_stopped_run_resumes_to_the_same_steps(trained, tmp_path):
    """Stopped at step STOP_AT (its checkpoint), resumed and stopped again RESUMED steps later:
    the resumed steps' rows (sampled with the restored params, seeds and prompt order) are the
    uninterrupted run's; the steps after them would prove nothing more."""
    from jaxft.io.metrics import read_metrics

    tmp, config, rows, _ = trained

    def stop(info):
        raise Stop

    with pytest.raises(Stop):
        run(config, tmp_path / "run", kind="dpo", hooks=(Hook(stop, every=STOP_AT),))
    with pytest.raises(Stop):
        run(config, tmp_path / "run", kind="dpo", hooks=(Hook(stop, every=STOP_AT + RESUMED),))
    resumed = [r for r in read_metrics(tmp_path / "run") if "loss" in r and r["step"] > STOP_AT]
    assert [r["step"] for r in resumed] == list(range(STOP_AT + 1, STOP_AT + RESUMED + 1))
    keys = ("loss", "objective/scores", "objective/ties", "val/completion_length", "rewards/margins")
    for got, want in zip(resumed, rows[STOP_AT:]):
        for k in keys:
            assert got[k] == pytest.approx(want[k], abs=1e-6), (got["step"], k)


def test_pairs_take_the_higher_reward_as_chosen_and_leave_ties_empty():
    from jaxft.data.prompts import PromptBatch
    from jaxft.inference.completions import Completion

    prompts = PromptBatch([{}, {}, {}], [[1, 2], [3], [4, 5, 6]], [7, 8, 9])
    completions = [[Completion("", [10, 11], "eos"), Completion("", [12], "eos")],
                   [Completion("", [13], "eos"), Completion("", [14], "eos")],
                   [Completion("", [15], "length"), Completion("", [16, 17, 18], "eos")]]
    rewards = {"reward": np.array([[0.0, 1.0], [0.5, 0.5], [2.0, -1.0]]),
               "reward/answer": np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])}
    pairs, metrics = online_dpo.pair_examples(prompts, completions, rewards)
    assert pairs[1] is None  # a tie: no pair
    assert pairs[0].chosen_ids.tolist() == [1, 2, 12] and pairs[0].chosen_mask.tolist() == [0, 0, 1]
    assert pairs[0].rejected_ids.tolist() == [1, 2, 10, 11] and pairs[0].rejected_mask.tolist() == [0, 0, 1, 1]
    assert pairs[2].chosen_ids.tolist() == [4, 5, 6, 15] and pairs[2].rejected_ids.tolist() == [4, 5, 6, 16, 17, 18]
    assert (pairs[0].index, pairs[2].index) == (7, 9)
    assert metrics == pytest.approx({
        "objective/scores": 0.5, "objective/scores/answer": 4 / 6, "objective/scores_margin": (1 + 0 + 3) / 3,
        "objective/ties": 1 / 3, "val/contain_eos_token": 5 / 6, "val/completion_length": 9 / 6})


@pytest.mark.parametrize("override, message", [
    ({"dpo.online_rewards": ""}, "config key dpo.online_rewards: online DPO scores its samples"),
    ({"dpo.online_rewards": "answer,nope"}, r"dpo.online_rewards\[1\]: unknown reward kind 'nope'"),
    ({"dpo.online_rewards": "answer:x"}, "dpo.online_rewards: 'answer:x': the weight after ':' must be a number"),
    ({"dpo.online_max_new_tokens": 0}, "config key dpo.online_max_new_tokens: must be >= 1"),
    ({"dpo.online_max_new_tokens": 128}, "config key dpo.online_max_new_tokens: must be below data.max_length=128"),
    ({"dpo.online_temperature": 0.0}, "config key dpo.online_temperature: must be > 0"),
    ({"data.packing": True}, "config key data.packing: online DPO lays each sampled pair out unpacked"),
    ({"dpo.precompute_reference": True}, "config key dpo.precompute_reference: online DPO samples"),
])
def test_config_mistakes_fail_before_anything_runs_naming_the_key(override, message, tmp_path):
    config = load(f"{CONFIG}:tiny", {"model.path": str(tmp_path / "missing"), **override})
    with pytest.raises(ConfigError, match=message):
        run(config, tmp_path / "run", kind="dpo")
    assert not (tmp_path / "run").exists()  # refused before the workdir, the model or the data


def test_the_prompts_resume_where_they_stopped_and_refuse_other_prompts(tmp_path):
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.data.prompts import load_prompts

    tok = load_bundled_tokenizer()
    source = quickstart_head(tmp_path, "sft_train.jsonl", 10)

    def make():
        return load_prompts(str(source), tok, batch_size=4, seed=3, max_length=64, max_new_tokens=8)

    it = make()
    batches = [next(it) for _ in range(6)]  # 24 prompts: 2.4 passes, each pass a fresh order
    drawn = [i for b in batches for i in b.indices]
    assert sorted(drawn[:10]) == sorted(drawn[10:20]) == list(range(10))  # every prompt once an epoch
    assert drawn[:10] != list(range(10)) and drawn[:10] != drawn[10:20]  # each epoch its own order
    assert batches[0].records[0]["answer"] and batches[0].prompt_ids[0][0] == tok.bos_token_id
    it2 = make()
    next(it2)
    it2.set_state(json.loads(json.dumps(it.get_state())))
    assert next(it2).indices == it.batch_at(6).indices
    source.write_text(source.read_text().replace('"answer": "', '"answer": "1'))
    with pytest.raises(ValueError, match="the same 10 prompts, other records or tokens"):
        make().set_state(it.get_state())

