"""`jaxft bench`: step throughput measured side by side, on the same tokens, in one process.

It measures what a user runs by default (`jaxft.perf.bench_setup`): the settings of
`configs/sft.py` and `configs/dpo.py` without a preset (param and compute dtype, remat,
attention, the loss chunk as a run resolves it), on one batch shaped like user data: B rows =
B/2 DPO pairs of random tokens, each row right-padded to L from a real length between L and
L/2 (segment_ids 0 and loss_mask 0 on the padding), its first L/4 tokens a prompt out of the
loss. For each length in `lengths` it times jaxft's step kinds:
  sft               the SFT step with the default loss (chunked unless the config says 0)
  sft_full_logits   the SFT step with the whole [B, L, V] logits (loss_chunk_size 0)
  dpo               the DPO step with a precomputed reference table (no reference forward)
  dpo_reference     the DPO step with a reference forward per step
and, with `compare=("torch", "tunix")`, the same model in transformers + PyTorch
(`benchmarks/bench_torch.py`, at the same precision and remat) and in Tunix (`benchmarks/bench_tunix.py`):
each library's SFT step and DPO step with a reference forward, in the same alternating
rounds. Every kind reports tokens/s (every position of the [B, L] batch, padding included,
for every library alike), step time, MFU (known accelerators only), the first call's time
(compile + one step) and the compiled step's peak memory (XLA's memory analysis, per device).

Steps go through the model every run builds (`create_model(cfg)`: scanned layers, the
configured attention backend) and the steps' own jit with shardings and donation.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Sequence

import jax

from jaxft.errors import ConfigError, PathError
from jaxft.io.metrics import device_peak_flops, train_flops_per_token
from jaxft.models.config import dtype_name
from jaxft.parallel import sharding
from jaxft.perf import bench_cases
from jaxft.perf.bench_cases import KINDS, LORA_KINDS, Case
from jaxft.perf.bench_report import VERSUS, format_bench, format_length
from jaxft.perf.bench_setup import batch_counts, bench_batch, bench_config

# The libraries `compare` times (each its SFT step and its DPO step with a reference forward):
# name -> (module with check_available() and the bench class, that class).
LIBRARIES = {"torch": ("bench_torch", "TorchBench"), "tunix": ("bench_tunix", "TunixBench")}
# Those comparisons are not part of the library: they live in a source checkout's benchmarks/,
# beside the recipes (configs/) the bench runs.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
COMPARE = tuple(LIBRARIES)
COMPARE = tuple(LIBRARIES)
log = logging.getLogger(__name__)


def _summary(seconds: float, steps: int, case: Case, tokens: int, mfu_per_token: float | None) -> dict:
    tokens_per_sec = tokens / seconds
    return {
        "tokens_per_sec": tokens_per_sec, "step_time": seconds,
        "mfu": mfu_per_token * tokens_per_sec if mfu_per_token else None,
        "peak_bytes": case.peak_bytes, "compile_s": case.compile_s, "steps_per_round": steps,
    }


def _library(name: str):
    """(the module benching library `name`, from benchmarks/ of the source checkout, its bench class)."""
    stem, bench_class = LIBRARIES[name]
    module_name = f"benchmarks.{stem}"
    module = sys.modules.get(module_name)
    if module is None:
        path = BENCHMARKS / f"{stem}.py"
        if not path.is_file():
            raise PathError(f"--compare {name} times the steps in {path}, which is not there: run jaxft bench "
                            "from a source checkout (pip install -e .)")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module, getattr(module, bench_class)


def _check_compare(compare: Sequence[str]) -> None:
    """Raises, naming what to install, if a comparison cannot run."""
    for name in compare:
        if name not in COMPARE:
            raise ConfigError(f"--compare {name!r}: choose from {', '.join(COMPARE)}")
        _library(name)[0].check_available()


def _measure_length(report: dict, length: int, cases: dict[str, Case], *, cfg, batch_size: int, kinds,
                    steps: int | None, rounds: int, peak_flops: float | None) -> None:
    """Times `cases` (jaxft's kinds, then "library/kind") in alternating rounds and writes
    report["lengths"][length] and each library's report["compare"][lib]["lengths"][length]."""
    log.info("bench: %d tokens: first calls (compile + one step) %s", length,
             ", ".join(f"{n} {c.compile_s:.1f} s" for n, c in cases.items()))
    measured = bench_cases.measure(cases, steps=steps, rounds=rounds)
    tokens = batch_size * length
    # MFU = flops_per_token * tokens/s / (peak * devices): pass the per-token share.
    mfu_per_token = (train_flops_per_token(cfg, length) / (peak_flops * jax.device_count())
                     if peak_flops else None)
    row = {name: _summary(*measured[name], cases[name], tokens, mfu_per_token) for name in kinds}
    for r in row.values():
        r["ratio_to_sft"] = r["step_time"] / row["sft"]["step_time"]
    report["lengths"][str(length)] = row
    for library, theirs_report in report["compare"].items():
        theirs = {name: _summary(*measured[f"{library}/{name}"], cases[f"{library}/{name}"], tokens, None)
                  for name in ("sft", "dpo_reference")}
        theirs["ratio"] = {kind: row[kind]["tokens_per_sec"] / theirs[vs]["tokens_per_sec"]
                           for kind, vs in VERSUS.items()}
        theirs_report["lengths"][str(length)] = theirs


def run_bench(*, preset: str = "tiny", batch_size: int = 8, lengths: int | Sequence[int] = 256,
              steps: int | None = None, rounds: int = 3, chunk_size: int | None = None, compute_dtype=None,
              remat: str | None = None, attention: str | None = None, overrides: dict | None = None,
              compare: Sequence[str] = (), lora_rank: int = 0) -> dict:
    """Times every step kind at every length; returns the JSON-able report

    {"sft" | "sft_full_logits" | "dpo" | "dpo_reference": {tokens_per_sec, step_time (s), mfu,
      peak_bytes, compile_s, steps_per_round, ratio_to_sft}   (the first length's),
     "lengths": {"256": {kind: ...}, ...}, "scaling": {kind: tokens/s longest / shortest},
     "batch": {"256": {"positions", "real_tokens", "trained_tokens"}, ...},
     "device": {...}, "config": {..., "settings": {param_dtype, compute_dtype, remat, attention,
       attention_backend, loss_chunk_size (as set), loss_chunk (as the steps use it),
       overridden}},
     "compare": {"torch" | "tunix": {"lengths": {"256": {"sft" | "dpo_reference": {...},
                 "ratio": {kind: jaxft tokens/s / theirs}}}, "sft", "dpo_reference",
                 "ratio" (the first length's), "scaling", "library"}}}.

    The settings are `bench_setup.user_settings()` (configs/sft.py and configs/dpo.py without
    a preset); compute_dtype, remat, attention and chunk_size (train.loss_chunk_size for both
    methods: -1 auto, 0 whole logits, > 0 tokens) override them when given. steps: per timed round;
    None picks 1-5 per kind (about a second a round). mfu is None off the known accelerators
    (`jaxft.io.metrics.PEAK_FLOPS`). lora_rank > 0 adds "sft_lora" and "dpo_lora" (LoRA of that
    rank on every projection, alpha = 2 x rank) to every length.
    """
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths or min(lengths) < 2 or batch_size < 2 or batch_size % 2:
        raise ConfigError(f"jaxft bench: need lengths >= 2 and an even batch size (rows = 2 x DPO pairs); "
                         f"got lengths {lengths}, batch size {batch_size}")
    _check_compare(compare)  # before anything compiles
    cfg, settings = bench_config(preset, overrides=overrides, compute_dtype=compute_dtype, remat=remat,
                                 attention=attention, chunk_size=chunk_size)
    mesh = sharding.make_mesh(data=-1)
    others = {name: _library(name)[1](cfg) for name in dict.fromkeys(compare)}  # the same architecture
    kinds = KINDS + (LORA_KINDS if lora_rank else ())
    report = {"lengths": {}, "batch": {}, "compare": {name: {"lengths": {}} for name in others}}
    with jax.set_mesh(mesh):
        jax_cases = bench_cases.jax_cases(cfg, batch_size=batch_size, chunk_size=chunk_size, lora_rank=lora_rank,
                                          mesh=mesh)
        for length in lengths:
            host = bench_batch(batch_size, length, cfg.vocab_size)
            report["batch"][str(length)] = batch_counts(host)
            cases = jax_cases(host)
            for library, other in others.items():  # after jaxft's, in the same rounds: alternating
                for name, fn in other.cases(host).items():
                    cases[f"{library}/{name}"] = bench_cases.host_case(fn)
            _measure_length(report, length, cases, cfg=cfg, batch_size=batch_size, kinds=kinds, steps=steps,
                            rounds=rounds, peak_flops=device_peak_flops())
            # A long bench that is stopped keeps what it measured: each length's table as it ends.
            log.info("bench: %d tokens:\n%s", length, "\n".join(format_length(report, str(length))))
    _summarize(report, lengths, kinds, others)
    device = jax.devices()[0]
    report["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    report["config"] = {"preset": preset, "batch_size": batch_size, "lengths": lengths, "steps": steps,
                        "rounds": rounds, "settings": settings, "model": _model_summary(cfg)}
    return report


def _summarize(report: dict, lengths: list, kinds, others: dict) -> None:
    """The first length's entries at the top level, and tokens/s scaling longest / shortest."""
    first, last = str(lengths[0]), str(lengths[-1])
    report.update(report["lengths"][first])
    report["scaling"] = _scaling(report["lengths"], first, last, kinds)
    for library, other in others.items():
        theirs = report["compare"][library]
        theirs.update(theirs["lengths"][first])
        theirs["scaling"] = _scaling(theirs["lengths"], first, last, ("sft", "dpo_reference"))
        theirs["library"] = other.description


def _model_summary(cfg) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "tie_word_embeddings", "scan_layers", "remat")
    return {k: getattr(cfg, k) for k in keys} | {
        "head_dim": cfg.dim_per_head, "num_params": cfg.num_params(),
        "param_dtype": dtype_name(cfg.param_dtype), "compute_dtype": dtype_name(cfg.compute_dtype)}


def _scaling(by_length: dict, first: str, last: str, kinds) -> dict:
    """{kind: tokens/s at the longest length / at the shortest} (1.0 = no cost growth)."""
    return {k: by_length[last][k]["tokens_per_sec"] / by_length[first][k]["tokens_per_sec"] for k in kinds}



__all__ = ["COMPARE", "KINDS", "LORA_KINDS", "format_bench", "run_bench"]
