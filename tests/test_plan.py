"""`jaxft plan`: a step compiled ahead of time for a TPU topology (libtpu, no TPU) reports
XLA's per-device memory, consistent with the shardings the run would give its state."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

import jaxft.config
from jaxft import cli
from jaxft.perf import plan as plan_lib
from jaxft.data.assets import BUNDLED_TOKENIZER_DIR
from jaxft.models import config_to_hf, get_preset

ROOT = Path(__file__).resolve().parents[1]
NO_LIBTPU = importlib.util.find_spec("libtpu") is None
needs_libtpu = pytest.mark.skipif(NO_LIBTPU, reason='libtpu is not installed: pip install "jaxft[tpu]"')
# Every number of the table, as `jaxft plan --json` writes them.
JSON_KEYS = {"target", "kind", "model", "compiled", "devices", "mesh", "settings", "num_params", "batch_rows",
             "seq_len", "tokens_per_step", "param_bytes", "opt_state_bytes", "argument_bytes", "output_bytes",
             "alias_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "fits", "flops_per_step",
             "step_seconds_estimate", "mfu_assumed", "peak_flops_per_chip", "compile_seconds", "compile_error",
             "suggestions", "notes", "frozen_bytes", "collectives"}


def tiny(kind="sft", **overrides):
    return jaxft.config.load(str(ROOT / f"configs/{kind}.py:tiny"), overrides)


_cache = {}


def planned(kind, target, **overrides):
    """plan() of the tiny config, each combination compiled once per test session."""
    key = (kind, target, tuple(sorted(overrides.items())))
    if key not in _cache:
        _cache[key] = plan_lib.plan(tiny(kind, **overrides), target=target, kind=kind)
    return _cache[key]


@needs_libtpu
@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("target,chips,mesh", [
    ("v5p-8", 4, {"mesh.data": 1, "mesh.fsdp": -1}),  # params sharded 4 ways
    ("v5e-16", 16, {}),  # the tiny config's data parallelism: params replicated
])
def test_a_tiny_step_compiles_for_a_tpu_slice_with_consistent_memory(kind, target, chips, mesh):
    r = planned(kind, target, **mesh)
    assert r.compiled and r.devices == chips and math.prod(r.mesh.values()) == chips
    for name in ("param_bytes", "opt_state_bytes", "argument_bytes", "output_bytes", "total_bytes",
                 "flops_per_step", "step_seconds_estimate"):
        assert getattr(r, name) > 0, name
    # v5e / v6e report no HBM temporaries for a step this small (a longer one has them).
    assert r.temp_bytes > 0 if target.startswith("v5p") else r.temp_bytes >= 0
    assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    assert r.alias_bytes > 0  # the state is donated: the new one is written in place
    # fp32 params split over fsdp (norms, ~0.1% of the params, are replicated).
    cfg = get_preset("tiny")
    assert r.num_params == cfg.num_params()
    assert r.param_bytes == pytest.approx(r.num_params * 4 / r.mesh["fsdp"], rel=0.02)
    assert r.opt_state_bytes == pytest.approx(2 * r.param_bytes, rel=0.01)  # AdamW mu and nu
    # The whole state is an argument (and the batch, and a DPO reference table).
    assert r.argument_bytes >= r.param_bytes + r.opt_state_bytes
    rows = 16 * (2 if kind == "dpo" else 1)  # unpacked DPO: a chosen and a rejected row per pair
    assert (r.batch_rows, r.seq_len, r.tokens_per_step) == (rows, 128, rows * 128)
    assert r.fits and not r.suggestions
    text = plan_lib.format_plan(r)
    assert target in text and "fits" in text and "compiled for the TPU topology" in text


@needs_libtpu
def test_context_parallel_splash_compiles_for_tpu_and_splits_the_activations():
    # A 2,048-token row: over 4 chips along sequence (splash per shard, 512 queries each) or
    # one row per chip over fsdp. Same params per chip; a quarter of the row's activations.
    long = {"data.max_length": 2048, "mesh.data": 1, "model.remat": "full", "train.loss_chunk_size": 256}
    split = planned("sft", "v5p-8", **long, **{"mesh.fsdp": 1, "mesh.sequence": 4, "train.batch_size": 1})
    rows = planned("sft", "v5p-8", **long, **{"mesh.fsdp": 4, "train.batch_size": 4})
    assert split.compiled and split.mesh == {"data": 1, "fsdp": 1, "expert": 1, "sequence": 4, "tensor": 1}
    assert split.settings["attention"] == "splash"
    assert split.param_bytes == pytest.approx(rows.param_bytes, rel=0.02)  # sharded over sequence too
    assert split.temp_bytes < 0.8 * rows.temp_bytes  # 0.65x here; 0.45x for Llama-3-8B at 32k (docs/planning.md)


@needs_libtpu
def test_offload_remat_compiles_for_tpu_and_moves_saved_matmuls_to_host_memory():
    # The CPU has no pinned host memory, so `offload` runs only on accelerators: compiled for
    # v5p it keeps what dots_no_batch keeps, but in host memory (24.5 vs 36.5 MB here).
    fsdp = {"mesh.data": 1, "mesh.fsdp": -1}
    on_device = planned("sft", "v5p-8", **fsdp, **{"model.remat": "dots_no_batch"})
    offloaded = planned("sft", "v5p-8", **fsdp, **{"model.remat": "offload"})
    assert offloaded.compiled and offloaded.settings["remat"] == "offload"
    assert offloaded.temp_bytes < 0.8 * on_device.temp_bytes
    assert offloaded.param_bytes == on_device.param_bytes


@needs_libtpu
def test_a_bigger_model_needs_more_memory(tmp_path):
    fsdp = {"mesh.data": 1, "mesh.fsdp": -1}
    small = planned("sft", "v5p-8", **fsdp)
    big_cfg = get_preset("tiny").replace(hidden_size=256, intermediate_size=768)  # as a model.path folder
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(big_cfg)))
    config = tiny(**fsdp, **{"model.path": str(tmp_path), "model.tokenizer": str(BUNDLED_TOKENIZER_DIR)})
    big = plan_lib.plan(config, target="v5p-8")
    assert big.num_params == big_cfg.num_params() > 2 * small.num_params
    assert big.param_bytes == pytest.approx(big.num_params * 4 / 4, rel=0.02)
    assert big.total_bytes > small.total_bytes and big.temp_bytes > small.temp_bytes
    assert big.flops_per_step > small.flops_per_step


@needs_libtpu
def test_a_step_too_big_for_the_chip_is_refused_by_xla_and_says_what_to_change(tmp_path):
    # 1.7B params in fp32 with AdamW on one 16 GiB v5e chip: the compiler refuses (in seconds).
    wide = get_preset("tiny").replace(hidden_size=8192, intermediate_size=28672, num_layers=2, num_heads=64,
                                      num_kv_heads=8)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(wide)))
    config = tiny(**{"model.path": str(tmp_path), "model.tokenizer": str(BUNDLED_TOKENIZER_DIR)})
    r = plan_lib.plan(config, target="v5e-1")
    assert "RESOURCE_EXHAUSTED" in r.compile_error and not r.fits
    assert r.param_bytes == r.num_params * 4 and r.temp_bytes > 0
    assert r.total_bytes == r.argument_bytes + r.temp_bytes > r.hbm_bytes
    assert r.suggestions[0].startswith("--config.model.remat=") and "mesh.fsdp" not in " ".join(r.suggestions)
    assert "DOES NOT FIT" in plan_lib.format_plan(r)


@needs_libtpu
def test_every_tpu_target_resolves_to_its_chips():
    for t in plan_lib.TARGETS.values():
        if t.topology:
            assert len(plan_lib.topology_devices(t)) == t.chips, t.name


@needs_libtpu
def test_the_cli_writes_every_number_as_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    cli.main(["plan", "--config", str(ROOT / "configs/sft.py:tiny"), "--config.mesh.fsdp=-1",
              "--config.mesh.data=1", "--target", "v5p-8", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == JSON_KEYS
    assert data["target"] == "v5p-8" and data["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1}
    assert data["settings"]["param_dtype"] == "float32" and data["settings"]["remat"] == "none"
    assert data["total_bytes"] == (data["argument_bytes"] + data["output_bytes"] - data["alias_bytes"]
                                   + data["temp_bytes"])
    assert "v5p-8" in printed and "fits" in printed
    # FSDP over 4 chips: the weights' all-gathers; no expert axis, so no all-to-all but the loss's
    assert data["collectives"]["all-gather"] > 0 and "collectives in the compiled program" in printed


def test_an_unknown_target_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown target 'v5p-7'.*v5p-8.*v5e-16.*v6e-256"):
        plan_lib.plan(tiny(), target="v5p-7")
    with pytest.raises(SystemExit, match="unknown target"):
        cli.main(["plan", "--config", str(ROOT / "configs/sft.py:tiny"), "--target", "tpu-9000"])


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RuntimeError, match=r'pip install "jaxft\[tpu\]"'):
        plan_lib.plan(tiny(), target="v5p-8")


def test_target_names_count_tensorcores_for_v4_and_v5p_and_chips_for_v5e_and_v6e():
    t = plan_lib.TARGETS
    assert (t["v5p-8"].topology, t["v5p-8"].chips, t["v5p-64"].chips) == ("v5p:2x2x1", 4, 32)
    assert (t["v4-32"].chips, t["v5e-16"].topology, t["v6e-256"].topology) == (16, "v5e:4x4", "v6e:16x16")
    assert {t[n].hbm_gib for n in ("v4-8", "v5e-4", "v5p-8", "v6e-4")} == {32, 16, 95}


def test_gpu_targets_are_an_analytic_estimate_labelled_as_such():
    r = plan_lib.plan(tiny(**{"mesh.data": 1, "mesh.fsdp": -1}), target="8xH100")
    assert not r.compiled and r.hbm_bytes == 80 * 1024**3
    assert r.param_bytes == r.num_params * 4 // 8 and r.opt_state_bytes == 2 * r.param_bytes
    assert r.total_bytes == r.argument_bytes + r.temp_bytes > 0
    assert "analytic, not compiled" in plan_lib.format_plan(r)


def test_suggestions_come_in_order_and_only_when_they_apply():
    config = tiny()  # remat none, data parallel, 16 rows, whole-vocabulary loss
    cfg = plan_lib.plan_model_config(config)
    got = plan_lib.suggestions(config, cfg, {"data": 4, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}, 4)
    assert [s.split("=")[0] for s in got] == ["--config.model.remat", "--config.mesh.fsdp",
                                              "a smaller --config.train.batch_size or --config.optim.accumulate",
                                              "--config.train.loss_chunk_size"]
    config = tiny(**{"model.remat": "full", "mesh.data": 1, "mesh.fsdp": -1, "train.batch_size": 4,
                     "train.loss_chunk_size": 64})
    assert plan_lib.suggestions(config, cfg, {"data": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1}, 4) == []


@needs_libtpu
@pytest.mark.parametrize("preset", ["gemma2_9b", "gemma3_4b", "phi4_14b"])
def test_each_family_compiles_for_a_tpu_slice(preset, tmp_path):
    # The family presets' parts (Gemma: sandwich (1 + w) norms, GeGLU, soft-caps, QK-norm, sliding
    # and full layers with their own RoPE as scan input; Phi-4) on a tiny body: the step of each
    # family compiles for v5p with its state sharded as a Llama's is.
    real = get_preset(preset)
    small = real.replace(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                         layer_types=real.layer_types and real.layer_types[:6],
                         sliding_window=real.sliding_window and 32,
                         query_pre_attn_scalar=real.query_pre_attn_scalar and 16)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(small)))
    config = tiny(**{"mesh.data": 1, "mesh.fsdp": -1, "model.path": str(tmp_path),
                     "model.tokenizer": str(BUNDLED_TOKENIZER_DIR)})
    built = plan_lib.plan_model_config(config)
    assert (built.model_type, built.layer_types, built.sandwich_norms) == (
        small.model_type, small.layer_types, small.sandwich_norms)
    r = plan_lib.plan(config, target="v5p-8")
    assert r.compiled and r.fits and r.compile_error is None
    assert r.num_params == small.num_params()
    assert r.param_bytes == pytest.approx(r.num_params * 4 / 4, rel=0.05)  # fp32, over fsdp 4
    assert r.temp_bytes > 0 and r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes


def test_a_lora_plan_sizes_full_fine_tuning_in_float32_whatever_the_base_dtype():
    """The note compares LoRA with full fine-tuning as the recipes run it (float32 weights and
    AdamW moments): for Gemma-3-27B over 4 shards, the 75.47 GiB a full plan compiles, not half."""
    import jax.numpy as jnp

    from jaxft.models.lora import PROJECTIONS, LoRASpec

    cfg = get_preset("gemma3_27b").replace(param_dtype=jnp.bfloat16,
                                           lora=LoRASpec(rank=16, alpha=16.0, targets=PROJECTIONS))
    notes = plan_lib._lora_notes(cfg, {"a": jnp.zeros((16, 4))}, {"fsdp": 4, "tensor": 1})
    assert "would hold 75.46 GiB per device" in notes[1] and "float32" in notes[1]


@needs_libtpu
def test_the_tpu_path_pins_attention_kernels_row_major_and_saves_their_transposed_copies(monkeypatch):
    """On v5p with splash attention the q / k / v / o kernels are pinned to row-major order:
    left free, XLA keeps transposed copies of the layer stack's f32 kernels alive across the
    layer loop (1.25 GiB per chip for Llama-3-8B at 8k tokens; here the tiny model, 1,024
    tokens: 262,176 bytes per device). Compiled memory is deterministic."""
    from jaxft.models import decoder

    overrides = {"mesh.data": 1, "mesh.fsdp": -1, "model.remat": "full", "data.max_length": 1024,
                 "train.batch_size": 4, "model.compute_dtype": "bfloat16"}
    pinned = plan_lib.plan(tiny(**overrides), target="v5p-8", kind="sft")
    monkeypatch.setattr(decoder, "with_layout_constraint", lambda x, layout: x)
    free = plan_lib.plan(tiny(**overrides), target="v5p-8", kind="sft")
    assert pinned.settings["attention"] == "splash"
    assert free.temp_bytes - pinned.temp_bytes >= 200_000, (pinned.temp_bytes, free.temp_bytes)
