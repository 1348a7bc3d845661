"""`jaxft bench`: every step kind measured, ratios that add up, the documented JSON, the
settings a user's run gets (the presetless configs), a batch padded like user data and the
PyTorch comparison on the same batch. One tiny run (1 layer, lengths 16 and 32, one step a
round) serves the tests that need timings: compiling the 8 steps is what takes the time. These
check the measurement, not the speed: the speed targets are a benchmark (docs/benchmarks.md)."""

import contextlib
import importlib.util
import io
import json
import logging
import sys

import numpy as np
import pytest

from jaxft import cli
from jaxft.perf.bench import KINDS, LORA_KINDS, format_bench
from jaxft.perf.bench_setup import CONFIGS, bench_batch, bench_config
from jaxft.config import load
from jaxft.losses import resolve_chunk_size, shift_targets
from jaxft.models import abstract_model, get_preset

ENTRY_KEYS = {"tokens_per_sec", "step_time", "mfu", "peak_bytes", "compile_s"}
# CI's newest-JAX venv has no PyTorch: there the run goes without the comparison.
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(the --json report, what the command printed, what it logged) of the documented
    invocation, shrunk."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    printed, logged = io.StringIO(), _Records()
    bench_log = logging.getLogger("jaxft.perf.bench")
    bench_log.addHandler(logged)
    level = bench_log.level
    bench_log.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed):
            cli.main(["bench", "--preset", "tiny", "--layers", "1", "--batch-size", "8", "--lengths", "16,32", "--steps", "1",
                      "--rounds", "1", "--lora", "2", "--json", str(path)]
                     + (["--compare", "torch"] if HAS_TORCH else []))
    finally:
        bench_log.removeHandler(logged)
        bench_log.setLevel(level)
    return json.loads(path.read_text()), printed.getvalue(), logged.messages


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_every_kind_is_measured_at_every_length(bench):
    report, *_ = bench
    assert list(report["lengths"]) == ["16", "32"]
    for length, row in report["lengths"].items():
        assert list(row) == list(KINDS + LORA_KINDS)
        for name, r in row.items():
            assert ENTRY_KEYS <= set(r)
            assert r["tokens_per_sec"] > 0 and r["compile_s"] > 0 and r["peak_bytes"] > 0
            assert r["tokens_per_sec"] == pytest.approx(8 * int(length) / r["step_time"])  # 8 rows
            # each ratio is its step time over the SFT step's
            assert r["ratio_to_sft"] == pytest.approx(r["step_time"] / row["sft"]["step_time"])
            assert r["mfu"] is None  # a CPU has no known peak FLOPs
    assert report["config"]["settings"]["attention_backend"] == "blockwise"  # auto on CPU


def test_default_kinds_run_what_a_users_config_runs(bench):
    """With no flags the kinds run configs/sft.py's and configs/dpo.py's settings (no preset):
    their dtypes, remat, attention and loss chunk as the run resolves it; sft_full_logits is
    the whole-logits path beside it. The header says so."""
    report, printed, _ = bench
    settings, vocab = report["config"]["settings"], report["config"]["model"]["vocab_size"]
    assert settings["overridden"] == []
    for method in ("sft", "dpo"):
        config = load(str(CONFIGS[method]))
        assert settings["loss_chunk_size"][method] == config.train.loss_chunk_size
        assert settings["loss_chunk"][method] == resolve_chunk_size(config.train.loss_chunk_size, vocab)
        assert (settings["param_dtype"], settings["compute_dtype"], settings["remat"], settings["attention"]) == (
            config.model.dtype, config.model.compute_dtype, config.model.remat, config.model.attention)
    assert report["config"]["model"]["compute_dtype"] == settings["compute_dtype"]
    header = printed.split("###")[0]
    for text in (f"{settings['compute_dtype']} compute", f"remat {settings['remat']}",
                 f"chunks of {settings['loss_chunk']['sft']:,} trained tokens", "sft_full_logits: whole logits"):
        assert text in header
    if HAS_TORCH:  # the same precision (where this CPU has PyTorch kernels for it) and remat
        import torch

        from benchmarks.bench_torch import _cpu_kernels

        compute = settings["compute_dtype"]
        assert (f"float32 weights + {compute} autocast" if _cpu_kernels(torch, compute) else
                f"float32 weights and compute (PyTorch has no fast {compute} kernels") in header
        assert "gradient checkpointing on" in header


def test_flags_replace_the_configs_settings():
    """--chunk-size -1 is the auto chunk for the preset's vocabulary, as a run resolves it;
    --compute-dtype / --remat / --attention replace the configs' own, and the report says which."""
    import jax.numpy as jnp

    cfg, settings = bench_config("llama3_vocab_2x64", overrides={"num_layers": 1}, chunk_size=-1,
                                 compute_dtype=jnp.float32, remat="none", attention="reference")
    assert settings["loss_chunk"] == {"sft": resolve_chunk_size(-1, 128_256), "dpo": resolve_chunk_size(-1, 128_256)}
    assert settings["loss_chunk_size"] == {"sft": -1, "dpo": -1}
    assert (cfg.num_layers, cfg.compute_dtype, cfg.remat, cfg.attention) == (1, jnp.float32, "none", "reference")
    assert settings["overridden"] == ["compute_dtype", "remat", "attention", "loss_chunk_size"]
    _, whole = bench_config("llama3_vocab_2x64", chunk_size=0)
    assert whole["loss_chunk"] == {"sft": 0, "dpo": 0}


def test_bench_batch_is_padded_like_user_data():
    """Rows of varied real lengths, right-padded (segment 0, loss_mask 0, position 0 there), a
    prompt quarter out of the loss shared by a pair's rows; PyTorch gets the same rows and
    trains exactly the targets jaxft trains."""
    batch = bench_batch(8, 32, 512)
    real = (batch["segment_ids"] > 0).sum(1)
    assert real.tolist() == [32, 30, 27, 25, 23, 21, 18, 16]  # L down to L/2
    padding = batch["segment_ids"] == 0
    assert np.all(batch["segment_ids"][:, :16] == 1) and padding[:, 16:].any()
    assert not (batch["loss_mask"][padding].any() or batch["positions"][padding].any() or batch["tokens"][padding].any())
    assert np.all(batch["loss_mask"][:, :8] == 0) and np.all(batch["loss_mask"][~padding & (np.arange(32) >= 8)] == 1)
    np.testing.assert_array_equal(batch["tokens"][0::2, :8], batch["tokens"][1::2, :8])  # a pair's prompt
    if not HAS_TORCH:
        return
    from benchmarks.bench_torch import IGNORE, hf_inputs

    hf = hf_inputs(batch)
    np.testing.assert_array_equal(hf["input_ids"], batch["tokens"])
    np.testing.assert_array_equal(hf["attention_mask"], ~padding)
    # jaxft's target at t is token t + 1; PyTorch's loss reads labels[t + 1] at t
    _, target_mask = shift_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    np.testing.assert_array_equal(hf["labels"][:, 1:] != IGNORE, np.asarray(target_mask)[:, :-1] > 0)
    np.testing.assert_array_equal(hf["labels"][hf["labels"] != IGNORE], batch["tokens"][batch["loss_mask"] > 0])


def _param_count(cfg) -> int:
    """Parameters of jaxft's model for `cfg`, from shapes only (nothing allocated)."""
    import jax
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))


def test_real_shape_presets_have_the_published_sizes():
    """smollm2_135m is HuggingFaceTB/SmolLM2-135M (134,515,008 parameters, the embedding tied
    to the LM head), in jaxft and in transformers; llama3_vocab_2x64 is Llama 3's vocabulary
    whose embedding and head are 99% of the model."""
    smol = get_preset("smollm2_135m")
    assert smol.tie_word_embeddings and _param_count(smol) == smol.num_params() == 134_515_008
    big = get_preset("llama3_vocab_2x64")
    assert big.vocab_size == get_preset("llama3_8b").vocab_size == 128_256
    assert _param_count(big) == big.num_params() and 2 * 128_256 * 64 / big.num_params() > 0.99
    if HAS_TORCH:  # the comparison's model, on the meta device
        import torch
        import transformers

        from jaxft.models.config import config_to_hf

        hf = config_to_hf(smol)
        hf.pop("architectures")
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(hf.pop("model_type"), **hf))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_json_has_the_documented_keys(bench):
    report, *_ = bench
    assert {"sft", "dpo", "dpo_reference", "lengths", "device", "config", "compare"} <= set(report)
    for name in KINDS:  # top-level entries are the first length's
        assert report[name] == report["lengths"]["16"][name]
    assert report["config"]["lengths"] == [16, 32] and report["config"]["model"]["num_layers"] == 1
    assert report["device"]["platform"] == "cpu"
    lengths = report["lengths"]
    assert report["scaling"]["sft"] == pytest.approx(
        lengths["32"]["sft"]["tokens_per_sec"] / lengths["16"]["sft"]["tokens_per_sec"])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and transformers")
def test_torch_comparison_on_the_same_shapes(bench):
    report, *_ = bench
    torch = report["compare"]["torch"]
    assert "sdpa attention" in torch["library"] and list(torch["lengths"]) == ["16", "32"]
    for length, theirs in torch["lengths"].items():
        ours = report["lengths"][length]
        for name in ("sft", "dpo_reference"):
            assert theirs[name]["tokens_per_sec"] == pytest.approx(8 * int(length) / theirs[name]["step_time"])
        # jaxft tokens/s over PyTorch's; jaxft's DPO with a precomputed reference against
        # PyTorch's DPO step with its reference forward
        for kind in ("sft", "sft_full_logits"):  # both SFT paths against PyTorch's (whole-logits) step
            assert theirs["ratio"][kind] == pytest.approx(ours[kind]["tokens_per_sec"] / theirs["sft"]["tokens_per_sec"])
        assert theirs["ratio"]["dpo"] == pytest.approx(
            ours["dpo"]["tokens_per_sec"] / theirs["dpo_reference"]["tokens_per_sec"])
        assert theirs["ratio"]["dpo_reference"] == pytest.approx(
            ours["dpo_reference"]["tokens_per_sec"] / theirs["dpo_reference"]["tokens_per_sec"])
    assert torch["sft"] == torch["lengths"]["16"]["sft"]


def test_tables_are_printed(bench):
    report, printed, _ = bench
    assert printed.strip() == format_bench(report)  # format_bench reads the JSON form too
    for text in ("### 16 tokens", "### 32 tokens", "| dpo (precomputed reference) |", "| sft_full_logits (whole logits) |",
                 "96 real tokens of 128 positions", "LoRA: the sft_lora step takes",
                 "tokens/s at 32 relative to 16") + (("jaxft / PyTorch",) if HAS_TORCH else ()):
        assert text in printed


def test_each_length_is_logged_when_it_is_measured(bench):
    """A long bench stopped part-way keeps the lengths it finished: each length's table is
    logged as soon as it is measured, before the next length compiles."""
    report, printed, logged = bench
    tables = [m for m in logged if m.startswith("bench: ") and "### " in m]
    assert [m.split(":")[1].strip() for m in tables] == ["16 tokens", "32 tokens"]
    first_call_32 = next(i for i, m in enumerate(logged) if m.startswith("bench: 32 tokens: first calls"))
    assert logged.index(tables[0]) < first_call_32
    for table, length in zip(tables, ("16", "32")):
        body = table.split("\n", 1)[1]
        assert f"### {length} tokens" in body and body in printed  # the same lines the final report prints


HAS_TUNIX = importlib.util.find_spec("tunix") is not None


@pytest.mark.skipif(HAS_TUNIX, reason="Tunix is installed")
def test_missing_tunix_is_a_clear_error():
    with pytest.raises(SystemExit, match="--compare tunix needs Tunix"):
        cli.main(["bench", "--compare", "tunix"])


@pytest.mark.skipif(not HAS_TUNIX, reason="needs Tunix (CI installs it: .ci/run)")
def test_tunix_steps_train_the_same_architecture():
    """Tunix's model has jaxft's sizes, and each timed call is a real training step."""
    import jax
    from flax import nnx

    from benchmarks.bench_tunix import TunixBench
    from jaxft.models import get_preset

    cfg = get_preset("tiny").replace(num_layers=1)
    tunix = TunixBench(cfg)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(tunix.sft_trainer.model, nnx.Param))) == cfg.num_params()
    cases = tunix.cases(bench_batch(4, 16, cfg.vocab_size))
    assert set(cases) == {"sft", "dpo_reference"}
    for name, trainer in (("sft", tunix.sft_trainer), ("dpo_reference", tunix.dpo_trainer)):
        before = jax.tree.map(lambda x: x.copy(), nnx.state(trainer.model, nnx.Param))
        cases[name]()
        after = nnx.state(trainer.model, nnx.Param)
        assert any(not (a == b).all() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))), name
    reference = nnx.state(tunix.dpo_trainer.ref_model, nnx.Param)  # frozen: as initialised
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(before)))


def test_bad_backend_or_missing_torch_fail_before_timing(monkeypatch):
    with pytest.raises(SystemExit, match="not an attention backend"):
        cli.main(["bench", "--attention", "flashy"])
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(SystemExit, match="--compare torch needs PyTorch and transformers"):
        cli.main(["bench", "--compare", "torch"])
