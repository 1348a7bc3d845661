"""`jaxft bench`: every step kind measured, ratios that add up, the documented JSON, and the
PyTorch comparison on the same shapes. One tiny run (1 layer, lengths 16 and 32, one step a
round) serves every test: compiling the 8 steps is what takes the time. These check the
measurement, not the speed: the speed targets are a benchmark (README "Benchmarks")."""

import contextlib
import importlib.util
import io
import json
import logging
import sys

import pytest

from jaxft import cli
from jaxft.bench import KINDS, LORA_KINDS, format_bench

ENTRY_KEYS = {"tokens_per_sec", "step_time", "mfu", "peak_bytes", "compile_s"}
# CI's newest-JAX venv has no PyTorch: there the run goes without the comparison.
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(the --json report, what the command printed, what it logged) of the documented
    invocation, shrunk."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    printed, logged = io.StringIO(), _Records()
    bench_log = logging.getLogger("jaxft.bench")
    bench_log.addHandler(logged)
    level = bench_log.level
    bench_log.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed):
            cli.main(["bench", "--layers", "1", "--batch-size", "8", "--lengths", "16,32", "--steps", "1",
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
    assert report["config"]["attention_backend"] == "blockwise"  # auto on CPU


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
        assert theirs["ratio"]["sft"] == pytest.approx(ours["sft"]["tokens_per_sec"] / theirs["sft"]["tokens_per_sec"])
        assert theirs["ratio"]["dpo"] == pytest.approx(
            ours["dpo"]["tokens_per_sec"] / theirs["dpo_reference"]["tokens_per_sec"])
        assert theirs["ratio"]["dpo_reference"] == pytest.approx(
            ours["dpo_reference"]["tokens_per_sec"] / theirs["dpo_reference"]["tokens_per_sec"])
    assert torch["sft"] == torch["lengths"]["16"]["sft"]


def test_tables_are_printed(bench):
    report, printed, _ = bench
    assert printed.strip() == format_bench(report)  # format_bench reads the JSON form too
    for text in ("### 16 tokens", "### 32 tokens", "| dpo (precomputed reference) |", "LoRA: the sft_lora step takes",
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

    from jaxft.bench import _batch
    from jaxft.bench_tunix import TunixBench
    from jaxft.models import get_preset

    cfg = get_preset("tiny").replace(num_layers=1)
    tunix = TunixBench(cfg)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(tunix.sft_trainer.model, nnx.Param))) == cfg.num_params()
    cases = tunix.cases(_batch(4, 16, cfg.vocab_size))
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
