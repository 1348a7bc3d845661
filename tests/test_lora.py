"""LoRA: adapters start at the base and merge exactly, the base stays bit-identical through SFT
and DPO steps, DPO's adapters-off reference is the base, checkpoints hold only adapters and
resume exactly, exports (merged HF folder, PEFT folder) equal the trained model, and PEFT
loads the adapter onto the transformers base with the same logits."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import config as config_lib, run as run_lib
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.pipeline import make_eval_batches
from jaxft.io.export import export_checkpoint
from jaxft.io.metrics import read_metrics
from jaxft.models import create_model, get_preset, load_hf, save_hf
from jaxft.models.adapters import adapters_off, init_adapters, merge_adapters
from jaxft.models.from_config import split_params
from jaxft.models.lora import PROJECTIONS, LoRASpec, resolve_targets
from jaxft.models.peft import load_peft, save_peft
from jaxft.parallel import sharding
from jaxft.parallel.batches import to_global
from jaxft.steps.common import jit_step
from jaxft.steps.dpo import batch_shardings, make_dpo_step, make_pair_logps_fn
from jaxft.steps.optimizer import make_optimizer
from jaxft.steps.sft import make_sft_step
from jaxft.steps.state import create_train_state
from tests.quickstart_subset import quickstart_head, sft_data

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def tiny_cfg(**changes):
    tok = load_bundled_tokenizer()
    return get_preset("tiny").replace(vocab_size=len(tok), **{**SMALL, **changes}), tok


def lora_of(cfg, rank=4, alpha=8.0, targets=PROJECTIONS, rslora=False):
    return cfg.replace(lora=LoRASpec(rank=rank, alpha=alpha, targets=tuple(targets), rslora=rslora))


def perturbed(adapters, seed=1, scale=0.05):
    """Adapters with B (and A) moved off their init, as training would."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def tokens_of(cfg, shape=(2, 24), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, shape), jnp.int32)


# --- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapters_are_the_base_and_merging_equals_the_adapted_forward(scan):
    cfg, _ = tiny_cfg(scan_layers=scan)
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        base_graphdef, base = split_params(create_model(cfg, seed=0, mesh=mesh))
        tokens = tokens_of(cfg)
        forward = jax.jit(lambda g, *weights: nnx.merge(g, *weights)(tokens), static_argnums=0)
        plain = forward(base_graphdef, base)
        lcfg = lora_of(cfg, rslora=scan)  # rsLoRA's scale on one of the two: the same code either way
        graphdef, adapters = init_adapters(lcfg, seed=3, mesh=mesh)
        # B starts at zero: the adapted model is its base (to float rounding: XLA compiles the
        # adapted program's dots apart from the plain one's, which can move the last bit).
        np.testing.assert_allclose(np.asarray(forward(graphdef, adapters, base)), np.asarray(plain), rtol=0, atol=1e-6)
        trained = perturbed(adapters)
        adapted = forward(graphdef, trained, base)
        assert float(jnp.abs(adapted - plain).max()) > 1e-2  # the adapters do something
        merged = forward(base_graphdef, merge_adapters(lcfg, base, trained))
        assert float(jnp.abs(merged - adapted).max()) <= 1e-5


def test_lora_dropout_is_drawn_from_the_key_and_off_without_one():
    cfg, _ = tiny_cfg()
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        _, base = split_params(create_model(cfg, seed=0, mesh=mesh))
        tokens = tokens_of(cfg)
        graphdef, adapters = init_adapters(lora_of(cfg).replace(lora=LoRASpec(
            rank=4, alpha=8.0, targets=PROJECTIONS, dropout=0.3)), seed=1, mesh=mesh)
        forward = jax.jit(lambda g, a, b, key: nnx.merge(g, a, b)(tokens, dropout_rng=key), static_argnums=0)
        trained, key = perturbed(adapters), jax.random.key(5)
        plain = nnx.merge(graphdef, trained, base)(tokens)
        a, b = forward(graphdef, trained, base, key), forward(graphdef, trained, base, key)
        other = forward(graphdef, trained, base, jax.random.key(6))
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the key decides the masks
        assert float(jnp.abs(a - plain).max()) > 1e-3 and float(jnp.abs(a - other).max()) > 1e-3
        no_dropout_graphdef, _ = init_adapters(lora_of(cfg), seed=1, mesh=mesh)
        assert np.array_equal(np.asarray(forward(no_dropout_graphdef, trained, base, key)), np.asarray(plain))


def test_adapters_shard_like_their_kernels():
    cfg, _ = tiny_cfg()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, adapters = init_adapters(lora_of(cfg), seed=0, mesh=mesh)
    attn, mlp = adapters["layers"]["self_attn"], adapters["layers"]["mlp"]
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(attn["q_proj_lora_a"]) == (None, "fsdp", None)  # [layers, embed, rank]
    assert spec(attn["q_proj_lora_b"]) == (None, None, "tensor", None)  # [layers, rank, heads, head_dim]
    assert spec(mlp["down_proj_lora_a"]) == (None, "tensor", None)  # [layers, mlp, rank]
    assert spec(mlp["down_proj_lora_b"]) == (None, None, "fsdp")  # [layers, rank, embed]


def test_targets_take_names_all_linear_and_regexes_and_reject_what_matches_nothing():
    assert resolve_targets("all-linear") == PROJECTIONS
    assert resolve_targets("v_proj, q_proj") == ("q_proj", "v_proj")
    assert resolve_targets(r"self_attn\..*") == ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj",
                                                 "kv_a_proj_with_mqa", "kv_b_proj")  # DeepSeek's latent attention
    assert resolve_targets(r"self_attn\.kv_") == ("kv_a_proj_with_mqa", "kv_b_proj")
    assert resolve_targets("mlp") == ("gate_proj", "up_proj", "down_proj")
    with pytest.raises(ValueError, match="lora.targets"):
        resolve_targets("qproj")
    with pytest.raises(ValueError, match="lora.rank"):
        LoRASpec(rank=0, alpha=1.0, targets=("q_proj",))


def test_lora_config_errors_name_the_key(tmp_path):
    for overrides, key in (({"lora.rank": -1}, "lora.rank"), ({"lora.rank": 4, "lora.alpha": 0.0}, "lora.alpha"),
                           ({"lora.init_from": str(tmp_path)}, "lora.init_from")):
        config = config_lib.load(f"{REPO}/configs/sft.py:tiny", overrides)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            config_lib.validate(config)


# --- the steps --------------------------------------------------------------------------------


def _lora_setup(mesh, lr=1e-2):
    cfg, tok = tiny_cfg()
    lcfg = lora_of(cfg, rank=4, alpha=8.0)
    base_graphdef, base = split_params(create_model(cfg, seed=0, mesh=mesh))
    graphdef, adapters = init_adapters(lcfg, seed=1, mesh=mesh)
    tx, schedule = make_optimizer(lr=lr, schedule="constant", total_steps=10)
    return cfg, tok, base_graphdef, base, graphdef, adapters, tx, schedule


def test_sft_steps_train_only_the_adapters_and_leave_the_base_bit_identical(tmp_path):
    mesh = sharding.make_mesh(data=2, fsdp=4)
    with jax.set_mesh(mesh):
        cfg, tok, _, base, graphdef, adapters, tx, schedule = _lora_setup(mesh)
        base_before = jax.tree.map(np.asarray, base)
        state, shardings = create_train_state(adapters, tx, mesh)
        # Optimizer state: moments of the adapters only (no base-sized leaf anywhere).
        adapter_sizes = sorted(x.size for x in jax.tree.leaves(state["params"]))
        assert max(x.size for x in jax.tree.leaves(state["opt_state"])) <= adapter_sizes[-1]
        rows = sharding.batch_sharding(mesh)
        step = jit_step(make_sft_step(graphdef, tx, schedule, accumulate=2), state_shardings=shardings,
                        batch_sharding=rows, frozen_shardings=jax.tree.map(lambda x: x.sharding, base))
        batches = list(make_eval_batches(str(quickstart_head(tmp_path, "sft_train.jsonl", 200)), tok, kind="sft",
                                         batch_size=8, max_length=64, packing=True))[:6]
        first = None
        for b in batches:
            state, m = step(state, {k: v for k, v in to_global(b, mesh).items()
                                    if k in ("tokens", "positions", "segment_ids", "loss_mask")}, base)
            first = first if first is not None else float(m["loss"])
        assert float(m["loss"]) < first
        b_leaves = [v for k, v in jax.tree.flatten_with_path(state["params"])[0] if "lora_b" in str(k[-1])]
        assert all(float(jnp.abs(x).max()) > 0 for x in b_leaves)  # every B moved off zero
        for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
            assert np.array_equal(before, np.asarray(after))  # neither donated nor updated


def test_dpo_with_adapters_off_reference_starts_at_ln2_and_equals_a_frozen_copy(tmp_path):
    from tests.test_dpo import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        cfg, tok, base_graphdef, base, graphdef, adapters, tx, schedule = _lora_setup(mesh, lr=1e-2)
        adapters = perturbed(adapters, scale=0.02)  # as after lora.init_from: policy != base
        batches = list(make_eval_batches(pairs, tok, kind="dpo", batch_size=8, max_length=64, packing=False))
        logps = jax.jit(make_pair_logps_fn(graphdef, num_segments=1))
        plain = jax.jit(make_pair_logps_fn(base_graphdef, num_segments=1))
        batch = to_global(batches[0], mesh)
        off = logps((adapters_off(adapters), base), batch)
        copy = plain(jax.tree.map(jnp.copy, base), batch)
        for key in ("chosen", "rejected"):
            assert float(jnp.abs(off[key] - copy[key]).max()) <= 1e-6

        base_before = jax.tree.map(np.asarray, base)
        fresh = init_adapters(lora_of(cfg, rank=4, alpha=8.0), seed=1, mesh=mesh)[1]
        state, shardings = create_train_state(fresh, tx, mesh)
        base_sh = jax.tree.map(lambda x: x.sharding, base)
        step = jit_step(make_dpo_step(graphdef, tx, schedule, loss_kwargs={"loss_type": "sigmoid", "beta": 0.1},
                                      reference_mode="params", num_segments=1, rows_per_pair=2),
                        state_shardings=shardings, batch_sharding=batch_shardings(mesh), leading_shardings=(None,),
                        frozen_shardings=base_sh)
        state, m = step(state, None, batch, base)  # the reference is the base itself: no copy
        assert abs(float(m["loss"]) - math.log(2)) < 1e-6
        for b in batches[1:4]:
            state, m = step(state, None, to_global(b, mesh), base)
        assert float(m["loss"]) < math.log(2)
        for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
            assert np.array_equal(before, np.asarray(after))


# --- runs, checkpoints and exports ------------------------------------------------------------


LORA_RUN = {
    "train.steps": 6, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
    "train.log_every": 1, "train.save_every": 3, "train.eval_every": 6, "optim.warmup_steps": 0,
    "optim.schedule": "constant", "optim.lr": 5e-3, "lora.rank": 4, "lora.alpha": 8.0, "mesh.data": -1,
    "lora.dropout": 0.1,  # drawn per (seed, step, micro-batch): the resume test checks it is exact
}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny random base model as a Hugging Face folder (what model.path points at)."""
    cfg, tok = tiny_cfg()
    return save_hf(create_model(cfg, seed=7), tmp_path_factory.mktemp("base") / "hf", tokenizer=tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return sft_data(tmp_path_factory.mktemp("data"), 128)


def lora_config(base_folder, data, **overrides):
    return config_lib.load(f"{REPO}/configs/sft.py:tiny", {
        **LORA_RUN, **data, "model.path": str(base_folder), "model.preset": "", **overrides})


@pytest.fixture(scope="module")
def lora_run(base_folder, data, tmp_path_factory) -> run_lib.RunResult:
    return run_lib.run(lora_config(base_folder, data), tmp_path_factory.mktemp("lora"))


def test_a_lora_run_learns_saves_only_adapters_and_exports_both_folders(lora_run):
    losses = [r["loss"] for r in read_metrics(lora_run.workdir) if "loss" in r]
    assert losses[-1] < losses[0]
    saved = sorted((lora_run.workdir / "checkpoints").glob("*/state/_METADATA"))[-1]
    leaves = json.loads(saved.read_text())["tree_metadata"]
    params = [k for k in leaves if k.startswith("('params'")]
    assert params and all("_lora_" in k for k in params), params
    assert all("_lora_" in k for k in leaves if "'mu'" in k or "'nu'" in k)
    assert (lora_run.adapter_dir / "adapter_config.json").is_file()
    assert (lora_run.export_dir / "model.safetensors").is_file()


def _adapted_logits(lora_run, base_folder, tokens):
    """The trained LoRA model's logits, from its base folder and its PEFT adapter."""
    config = config_lib.from_json((lora_run.workdir / "config.json").read_text())
    from jaxft.models.from_config import model_config

    cfg = model_config(config, load_bundled_tokenizer())
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        _, base = split_params(load_hf(base_folder))
        graphdef, _ = init_adapters(cfg, seed=0, mesh=mesh)
        adapters = load_peft(lora_run.adapter_dir, cfg, mesh)
        return np.asarray(nnx.merge(graphdef, adapters, base)(tokens)), cfg, adapters


def test_merged_export_and_peft_round_trip_equal_the_trained_model(lora_run, base_folder, tmp_path):
    cfg0, _ = tiny_cfg()
    tokens = tokens_of(cfg0)
    adapted, cfg, adapters = _adapted_logits(lora_run, base_folder, tokens)
    merged = np.asarray(load_hf(lora_run.export_dir)(tokens))
    assert np.abs(merged - adapted).max() <= 1e-4
    again = export_checkpoint(lora_run.workdir, tmp_path / "merged", kind="merge")
    assert np.abs(np.asarray(load_hf(again)(tokens)) - merged).max() <= 1e-6
    # PEFT folder -> adapters -> PEFT folder is exact.
    with jax.set_mesh(sharding.make_mesh(data=-1)):
        out = save_peft(cfg, adapters, tmp_path / "again")
        back = load_peft(out, cfg, sharding.make_mesh(data=-1))
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="full fine-tuning|--merge"):
        export_checkpoint(lora_run.workdir, tmp_path / "x", kind="full")


def test_peft_loads_the_adapter_onto_the_transformers_base_with_equal_logits(lora_run, base_folder):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg0, _ = tiny_cfg()
    tokens = tokens_of(cfg0)
    ours, _, _ = _adapted_logits(lora_run, base_folder, tokens)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(lora_run.adapter_dir)).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.asarray(tokens).astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_resumed_lora_run_equals_the_uninterrupted_one(lora_run, base_folder, data, tmp_path):
    config = lora_config(base_folder, data, **{"train.steps": 3})
    run_lib.run(config, tmp_path, export=False)
    resumed = run_lib.run(lora_config(base_folder, data), tmp_path)
    assert resumed.step == 6
    ours = [r for r in read_metrics(tmp_path) if "loss" in r]
    ref = [r for r in read_metrics(lora_run.workdir) if "loss" in r]
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, ref)) <= 1e-6


def test_init_from_a_peft_adapter_continues_from_it_and_checks_its_settings(lora_run, base_folder, data, tmp_path):
    start = lora_config(base_folder, data, **{"lora.init_from": str(lora_run.adapter_dir), "train.steps": 1,
                                              "optim.lr": 1e-12, "train.eval_every": 1})
    out = run_lib.run(start, tmp_path / "continued", export=False)
    eval_loss = [r["eval_loss"] for r in out.metrics if "eval_loss" in r][0]
    trained = [r["eval_loss"] for r in lora_run.metrics if "eval_loss" in r][-1]
    assert abs(eval_loss - trained) <= 1e-5  # lr ~0: the eval is of the loaded adapter
    wrong = lora_config(base_folder, data, **{"lora.init_from": str(lora_run.adapter_dir), "lora.rank": 8})
    with pytest.raises(ValueError, match=r"--config\.lora\.rank=4"):
        run_lib.run(wrong, tmp_path / "wrong", export=False)


def test_lora_dpo_runs_with_the_precomputed_or_the_live_reference_alike(base_folder, tmp_path):
    from tests.test_dpo import dpo_config, losses_of, write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    losses = {}
    for precompute in (False, True):
        c = dpo_config(pairs, precompute=precompute)
        c.lora.rank, c.lora.alpha = 4, 8.0
        c.model.path, c.model.preset = str(base_folder), ""
        workdir = tmp_path / f"pre{precompute}"
        run_lib.run(c, workdir, kind="dpo", export=False)
        losses[precompute] = [r["loss"] for r in losses_of(workdir)]
    assert abs(losses[False][0] - math.log(2)) < 1e-6
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) <= 1e-5
    assert losses[False][-1] < losses[False][0]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_the_lora_presets_are_rank_16_all_linear_on_a_bf16_or_nf4_base(kind):
    for preset, quantization in (("llama3_8b_lora", "none"), ("llama3_8b_qlora", "nf4")):
        config = config_lib.load(f"{REPO}/configs/{kind}.py:{preset}",
                                 {"model.path": "/models/llama3", "data.train": "train.jsonl"})
        config_lib.validate(config)
        assert (config.lora.rank, config.lora.alpha, config.lora.targets) == (16, 32.0, "all-linear")
        assert config.lora.base_quantization == quantization and config.model.dtype == "bfloat16"


def _one_lora_step(mesh_shape, remat, data):
    """(loss, adapters after one step) of a LoRA SFT step on a packed batch, accumulating 2."""
    cfg, tok = tiny_cfg(remat=remat)
    lcfg = lora_of(cfg)
    mesh = sharding.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        _, base = split_params(create_model(cfg, seed=0, mesh=mesh))
        graphdef, adapters = init_adapters(lcfg, seed=1, mesh=mesh)
        adapters = perturbed(adapters, scale=0.02)  # B != 0: gradients reach A too
        tx, schedule = make_optimizer(lr=1e-3, schedule="constant", total_steps=10)
        state, shardings = create_train_state(adapters, tx, mesh)
        step = jit_step(make_sft_step(graphdef, tx, schedule, accumulate=2), state_shardings=shardings,
                        batch_sharding=sharding.batch_sharding(mesh),
                        frozen_shardings=jax.tree.map(lambda x: x.sharding, base))
        b = next(iter(make_eval_batches(data, tok, kind="sft", batch_size=8, max_length=64, packing=True)))
        batch = {k: v for k, v in to_global(b, mesh).items() if k in ("tokens", "positions", "segment_ids", "loss_mask")}
        state, m = step(state, batch, base)
        return float(m["loss"]), float(m["grad_norm"]), jax.tree.map(np.asarray, state["params"])


def test_lora_steps_agree_across_meshes_and_remat_policies(tmp_path):
    """Data parallel without remat against data x fsdp x tensor with the "dots" policy: each
    case compiles a step on 8 devices (issue 23: two cases, was three; "full" remat runs in
    test_context_parallel's and test_loss_paths' steps)."""
    data = str(quickstart_head(tmp_path, "sft_train.jsonl", 64))
    ref_loss, ref_norm, ref = _one_lora_step((8, 1, 1), "none", data)
    for mesh_shape, remat in (((2, 2, 2), "dots"),):
        loss, norm, adapters = _one_lora_step(mesh_shape, remat, data)
        assert abs(loss - ref_loss) <= 1e-5 and abs(norm - ref_norm) <= 1e-5 * ref_norm, (mesh_shape, remat)
        # Adam's first step is ~lr * sign(g): float noise in near-zero g moves it by <= 2 lr.
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(adapters)):
            assert np.abs(a - b).max() <= 1e-4, (mesh_shape, remat)


def test_resuming_with_another_lora_rank_fails_naming_it(lora_run, base_folder, data):
    with pytest.raises(ValueError, match=r"lora\.rank: checkpoint 4 -> now 8"):
        run_lib.run(lora_config(base_folder, data, **{"lora.rank": 8}), lora_run.workdir)


def test_a_workdir_from_before_lora_resumes_as_full_fine_tuning(tmp_path):
    from jaxft.io import checkpoint

    saved = config_lib.base_config().to_dict()
    del saved["lora"]  # a config.json written before lora.* existed
    checkpoint.check_resumable(saved, config_lib.base_config().to_dict(), tmp_path)  # no error
