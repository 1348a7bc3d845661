"""DPO step and run: ln 2 at policy == reference, frozen reference, precomputed == on-the-fly,
accumulation equivalence, learning a separable preference set."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models.from_config import split_params
from jaxft.parallel import sharding
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.pipeline import make_eval_batches
from jaxft.steps.common import jit_step
from jaxft.steps.dpo import batch_shardings, make_dpo_step
from jaxft.models import create_model, get_preset
from jaxft.steps.optimizer import make_optimizer
from jaxft.parallel.batches import to_global
from jaxft.io.metrics import read_metrics
from jaxft.run import run
from jaxft.steps.state import create_train_state

SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2)


def write_pairs(path, n=48):
    """A separable preference set: chosen answers are short and right, rejected repetitive."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"The answer is {a + b + 1}. " * 3}],
            }) + "\n")
    return str(path)


def dpo_config(train, *, steps=4, packing=False, precompute=False, accumulate=1, lr=1e-3, reference="policy"):
    spec = importlib.util.spec_from_file_location("dpo_cfg", "configs/dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.train, c.data.eval = train, ""
    c.data.max_length, c.data.packing = 64, packing
    c.train.steps, c.train.batch_size, c.train.log_every = steps, 8, 1
    c.train.save_every, c.train.progress = steps, False
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = lr, 0, "constant"
    c.optim.accumulate = accumulate
    c.dpo.precompute_reference, c.dpo.reference = precompute, reference
    c.dpo.loss_type, c.dpo.loss_weights = "sigmoid", ""  # plain DPO: ln 2 at step 0
    return c


def losses_of(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def small_model(mesh):
    tok = load_bundled_tokenizer()
    cfg = get_preset("tiny").replace(vocab_size=len(tok), **SMALL)
    return create_model(cfg, seed=0, mesh=mesh), tok


def test_policy_equals_reference_gives_ln2_and_zero_rewards_and_reference_stays_frozen(pairs):
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        model, tok = small_model(mesh)
        graphdef, params = split_params(model)
        tx, schedule = make_optimizer(lr=1e-3, schedule="constant", total_steps=10)
        reference = jax.tree.map(jnp.copy, params)
        reference_before = jax.tree.map(np.asarray, reference)
        state, shardings = create_train_state(params, tx, mesh)
        step = make_dpo_step(graphdef, tx, schedule, loss_kwargs={"loss_type": "sigmoid", "beta": 0.1},
                             reference_mode="params", num_segments=1, rows_per_pair=2)
        jitted = jit_step(step, state_shardings=shardings, batch_sharding=batch_shardings(mesh),
                          leading_shardings=(jax.tree.map(lambda x: x.sharding, reference),))
        batches = list(make_eval_batches(pairs, tok, kind="dpo", batch_size=8, max_length=64, packing=False))
        state, m = jitted(state, reference, to_global(batches[0], mesh))
        assert abs(float(m["loss"]) - math.log(2)) < 1e-6
        # Zero up to float32 noise in summed log-probs (policy and reference forwards are
        # compiled separately, with and without a gradient): a real reward is ~1e-2.
        assert abs(float(m["rewards/chosen"])) < 1e-5 and abs(float(m["rewards/margins"])) < 1e-5
        for b in batches[1:4]:
            state, m = jitted(state, reference, to_global(b, mesh))
        assert float(m["loss"]) < math.log(2)
        # The reference was neither donated nor updated: still readable and bit-identical.
        for before, after in zip(jax.tree.leaves(reference_before), jax.tree.leaves(reference)):
            assert np.array_equal(before, np.asarray(after))


def test_precomputed_reference_equals_on_the_fly_and_accumulation_equals_one_batch(pairs, tmp_path, monkeypatch):
    """The reference on the fly accumulating 4 micro-batches (2 pairs each: rows split over 2
    devices, the rest tensor-parallel) against the precomputed table in one batch: equal losses,
    rewards and evaluations prove both (issue 23: one pair of runs, was two tests of two runs)."""
    import jaxft.tasks.dpo as dpo_task

    passes = []  # held-out passes: the policy's at each evaluation, the frozen reference's once
    counted = dpo_task.pair_pass
    monkeypatch.setattr(dpo_task, "pair_pass", lambda *a: passes.append(1) or counted(*a))
    configs = [dpo_config(pairs, precompute=False, accumulate=4), dpo_config(pairs, precompute=True)]
    for c in configs:
        c.data.eval, c.train.eval_every = pairs, 2
        c.mesh.data, c.mesh.tensor = 2, -1
    run(configs[0], tmp_path / "fly", kind="dpo", export=False)
    assert len(passes) == 2 + 1  # evaluations at steps 2 and 4, the reference's pass once
    run(configs[1], tmp_path / "pre", kind="dpo", export=False)
    fly, pre = losses_of(tmp_path / "fly"), losses_of(tmp_path / "pre")
    assert len(fly) == len(pre) == 4
    for a, b in zip(fly, pre):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
        assert abs(a["rewards/accuracies"] - b["rewards/accuracies"]) < 1e-6
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / name) if "eval_loss" in r] for name in ("fly", "pre")]
    assert len(evals[0]) == len(evals[1]) == 2  # the reused reference log-probs are the precomputed table's
    assert np.allclose(evals[0], evals[1], atol=1e-5) and evals[0][1] != evals[0][0]
    assert list((tmp_path / "pre" / "reference_logps").glob("*.npy"))


def test_rewards_accuracies_rise_on_separable_pairs(pairs, tmp_path):
    run(dpo_config(pairs, steps=16, lr=2e-3), tmp_path / "learn", kind="dpo", export=False)
    rows = losses_of(tmp_path / "learn")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert np.mean([r["rewards/accuracies"] for r in rows[-3:]]) > 0.8
    assert rows[-1]["rewards/margins"] > 0


def test_reference_free_runs(pairs, tmp_path):
    run(dpo_config(pairs, steps=2, reference="none"), tmp_path / "free", kind="dpo", export=False)
    assert len(losses_of(tmp_path / "free")) == 2


def test_bad_dpo_setting_fails_at_start_naming_the_key(pairs, tmp_path):
    c = dpo_config(pairs)
    c.dpo.beta = 0.0
    with pytest.raises(ValueError, match="dpo.beta"):
        run(c, tmp_path / "bad", kind="dpo")



def test_packed_pairs_train_and_start_at_ln2(pairs, tmp_path):
    c = dpo_config(pairs, steps=3, packing=True)
    c.train.batch_size = 8  # packed rows, several pairs each
    run(c, tmp_path / "packed", kind="dpo", export=False)
    rows = losses_of(tmp_path / "packed")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_reference_from_another_folder_and_cached_table_reused_on_resume(pairs, tmp_path):
    from jaxft.models import save_hf

    tok = load_bundled_tokenizer()
    cfg = get_preset("tiny").replace(vocab_size=len(tok), **SMALL)
    save_hf(create_model(cfg, seed=3), tmp_path / "policy", tokenizer=tok)
    save_hf(create_model(cfg, seed=4), tmp_path / "other", tokenizer=tok)
    c = dpo_config(pairs, steps=2, precompute=True, reference=str(tmp_path / "other"))
    c.model.path = str(tmp_path / "policy")
    run(c, tmp_path / "run", kind="dpo", export=False)
    first = losses_of(tmp_path / "run")[0]
    # A different reference: step-0 rewards are not 0 and the loss is not ln 2.
    assert abs(first["rewards/margins"]) > 1e-4 and abs(first["loss"] - math.log(2)) > 1e-5
    tables = sorted((tmp_path / "run" / "reference_logps").glob("*.npy"))
    stamps = [t.stat().st_mtime_ns for t in tables]
    c.train.steps = 4  # resume: the precomputed table is read back, not recomputed
    run(c, tmp_path / "run", kind="dpo", export=False)
    assert sorted((tmp_path / "run" / "reference_logps").glob("*.npy")) == tables
    assert [t.stat().st_mtime_ns for t in tables] == stamps
    assert len(losses_of(tmp_path / "run")) == 4


def test_dpo_without_a_preset_is_plain_dpo_starting_at_ln2(pairs, tmp_path):
    # configs/dpo.py with no preset: the sigmoid loss alone (no NLL term), bf16 compute.
    from jaxft.config import load
    from jaxft.models import save_hf

    tok = load_bundled_tokenizer()
    save_hf(create_model(get_preset("tiny").replace(vocab_size=len(tok), **SMALL), seed=1), tmp_path / "sft",
            tokenizer=tok)
    config = load("configs/dpo.py", {
        "model.path": str(tmp_path / "sft"), "data.train": pairs, "data.max_length": 64,
        "train.epochs": 0.0, "train.steps": 1, "train.batch_size": 8, "train.log_every": 1,
        "train.progress": False})
    first = run(config, tmp_path / "run", kind="dpo", export=False).metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-2)
    assert abs(first["rewards/margins"]) < 0.05
