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
(`jaxft.perf.bench_torch`, at the same precision and remat) and in Tunix (`jaxft.perf.bench_tunix`):
each library's SFT step and DPO step with a reference forward, in the same alternating
rounds. Every kind reports tokens/s (every position of the [B, L] batch, padding included,
for every library alike), step time, MFU (known accelerators only), the first call's time
(compile + one step) and the compiled step's peak memory (XLA's memory analysis, per device).

Steps go through the model every run builds (`create_model(cfg)`: scanned layers, the
configured attention backend) and the steps' own jit with shardings and donation.
"""

from __future__ import annotations

from jaxft.errors import ConfigError
import dataclasses
import importlib
import logging
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxft.io.metrics import device_peak_flops, train_flops_per_token
from jaxft.models import create_model
from jaxft.models.adapters import init_adapters
from jaxft.models.config import dtype_name
from jaxft.models.from_config import split_params
from jaxft.models.lora import PROJECTIONS, LoRASpec
from jaxft.parallel import sharding
from jaxft.perf.bench_setup import batch_counts, bench_batch, bench_config, run_config
from jaxft.steps.common import ROW_KEYS
from jaxft.steps.optimizer import make_optimizer
from jaxft.steps.state import create_train_state
from jaxft.steps.weights import Weights
from jaxft.tasks import StepSetup, TrainStep
from jaxft.tasks.dpo import DPO
from jaxft.tasks.dpo_reference import Reference
from jaxft.tasks.sft import SFT

KINDS = ("sft", "sft_full_logits", "dpo", "dpo_reference")
# With --lora RANK: the LoRA SFT step (adapters train, the base is frozen) and DPO with adapters,
# its reference the base with the adapters off (a live forward, no second copy).
LORA_KINDS = ("sft_lora", "dpo_lora")
# Each jaxft kind against the step another library's loop would run for it: DPO with a
# precomputed reference is compared with their DPO step with its reference forward; both SFT
# kinds with their SFT step (whole logits, as plain transformers computes them).
VERSUS = {"sft": "sft", "sft_full_logits": "sft", "dpo": "dpo_reference", "dpo_reference": "dpo_reference"}
# The libraries `compare` times (each its SFT step and its DPO step with a reference forward):
# name -> (module with check_available() and the bench class, that class).
LIBRARIES = {"torch": ("jaxft.perf.bench_torch", "TorchBench"), "tunix": ("jaxft.perf.bench_tunix", "TunixBench")}
COMPARE = tuple(LIBRARIES)
LIBRARY_NAMES = {"torch": "PyTorch", "tunix": "Tunix"}
_ROUND_S = 1.0  # steps=None: about this long a round per kind (1 to 5 steps)
_MAX_AUTO_STEPS = 5
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Case:
    """One timed step kind: `run(n)` runs n steps back to back, waits for them and returns
    seconds per step; `compile_s` is the first call (trace + compile + one step)."""

    run: Callable[[int], float]
    compile_s: float
    peak_bytes: int | None = None


def _peak_bytes(compiled) -> int | None:
    """Bytes one device holds while the compiled step runs: inputs + outputs - the donated
    buffers outputs reuse + XLA's scratch."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def _jax_case(step: TrainStep, holder: dict, batch) -> Case:
    """Compiles the task's `step(state, batch)` ahead of time and times that plus a first step.
    All cases share `holder["state"]`: each step donates it and leaves the new one there."""
    start = time.perf_counter()
    args = (*step.leading, batch, *step.trailing)
    compiled = step.lower(holder["state"], batch).compile()
    holder["state"] = jax.block_until_ready(compiled(holder["state"], *args)[0])
    compile_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        state = holder["state"]
        for _ in range(n):  # dispatch ahead; wait once, at the end
            state = compiled(state, *args)[0]
        holder["state"] = jax.block_until_ready(state)
        return (time.perf_counter() - start) / n

    return Case(run, compile_s, _peak_bytes(compiled))


def _host_case(step: Callable[[], None]) -> Case:
    """Another library's step (a call that returns when the step is done); `compile_s` is its
    first call (PyTorch: eager; Tunix: trace + compile + one step)."""
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n

    return Case(run, compile_s)


def _measure(cases: dict[str, Case], *, steps: int | None, rounds: int) -> dict[str, tuple[float, int]]:
    """{name: (best seconds per step, steps per round)}. A warm-up step each, then interleaved
    rounds, best of each: a noisy neighbour slows every case alike, and the best round is the
    one least disturbed."""
    per_round = {}
    for name, case in cases.items():
        warm = case.run(1)
        per_round[name] = steps or max(1, min(_MAX_AUTO_STEPS, math.ceil(_ROUND_S / warm)))
    best = {name: math.inf for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            best[name] = min(best[name], case.run(per_round[name]))
    return {name: (best[name], per_round[name]) for name in cases}


def _summary(seconds: float, steps: int, case: Case, tokens: int, mfu_per_token: float | None) -> dict:
    tokens_per_sec = tokens / seconds
    return {
        "tokens_per_sec": tokens_per_sec, "step_time": seconds,
        "mfu": mfu_per_token * tokens_per_sec if mfu_per_token else None,
        "peak_bytes": case.peak_bytes, "compile_s": case.compile_s, "steps_per_round": steps,
    }


def _library(name: str):
    """(the module benching library `name`, its bench class)."""
    module, bench_class = LIBRARIES[name]
    module = importlib.import_module(module)
    return module, getattr(module, bench_class)


def _check_compare(compare: Sequence[str]) -> None:
    """Raises, naming what to install, if a comparison cannot run."""
    for name in compare:
        if name not in COMPARE:
            raise ConfigError(f"--compare {name!r}: choose from {', '.join(COMPARE)}")
        _library(name)[0].check_available()


def _setup(method: str, chunk_size: int | None, *, cfg, weights, tx, schedule, shardings, mesh) -> StepSetup:
    """The StepSetup of `method`'s run config (`bench_setup.run_config`) on the bench's model."""
    return StepSetup(config=run_config(method, chunk_size), model_config=cfg, mesh=mesh, weights=weights, tx=tx,
                     schedule=schedule, state_shardings=shardings)


def _lora_cases(cfg, rank: int, base, tx, schedule, mesh, chunk_size) -> Callable[[dict, dict], dict[str, Case]]:
    """`cases(sft_batch, dpo_batch)` -> {"sft_lora", "dpo_lora"}: LoRA of `rank` on every
    projection (alpha 2 x rank) over the frozen `base`; DPO's reference is the adapters off."""
    lora_cfg = cfg.replace(lora=LoRASpec(rank=rank, alpha=2.0 * rank, targets=PROJECTIONS))
    graphdef, adapters = init_adapters(lora_cfg, seed=1, mesh=mesh)
    state, shardings = create_train_state(adapters, tx, mesh)
    holder = {"state": state}
    kw = dict(cfg=lora_cfg, weights=Weights.of(graphdef, shardings["params"], base), tx=tx, schedule=schedule,
              shardings=shardings, mesh=mesh)

    def cases(sft_batch, batch):
        sft = SFT.build_train_step(_setup("sft", chunk_size, **kw))
        dpo = DPO.build_train_step(_setup("dpo", chunk_size, **kw), Reference("adapters_off"))
        return {"sft_lora": _jax_case(sft, holder, sft_batch), "dpo_lora": _jax_case(dpo, holder, batch)}

    return cases


def _measure_length(report: dict, length: int, cases: dict[str, Case], *, cfg, batch_size: int, kinds,
                    steps: int | None, rounds: int, peak_flops: float | None) -> None:
    """Times `cases` (jaxft's kinds, then "library/kind") in alternating rounds and writes
    report["lengths"][length] and each library's report["compare"][lib]["lengths"][length]."""
    log.info("bench: %d tokens: first calls (compile + one step) %s", length,
             ", ".join(f"{n} {c.compile_s:.1f} s" for n, c in cases.items()))
    measured = _measure(cases, steps=steps, rounds=rounds)
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
    rows_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    peak_flops = device_peak_flops()
    others = {}  # library -> its bench, on the same architecture
    for name in dict.fromkeys(compare):
        others[name] = _library(name)[1](cfg)

    report = {"lengths": {}, "batch": {}, "compare": {name: {"lengths": {}} for name in others}}
    with jax.set_mesh(mesh):
        model = create_model(cfg, seed=0, mesh=mesh)
        graphdef, params = split_params(model)
        tx, schedule = make_optimizer(lr=1e-5, schedule="constant", total_steps=1)
        reference = jax.tree.map(jnp.copy, params)  # the frozen reference: a policy copy
        state, shardings = create_train_state(params, tx, mesh)
        holder = {"state": state}
        ref_shardings = jax.tree.map(lambda x: x.sharding, reference)
        table = jax.device_put(jnp.zeros((batch_size // 2, 2), jnp.float32), replicated)
        kinds = KINDS + (LORA_KINDS if lora_rank else ())
        # The policy's initial params stay untouched (the full cases train copies): the LoRA base.
        lora_cases = _lora_cases(cfg, lora_rank, params, tx, schedule, mesh, chunk_size) if lora_rank else None

        weights = Weights.of(graphdef, shardings["params"])
        kw = dict(cfg=cfg, weights=weights, tx=tx, schedule=schedule, shardings=shardings, mesh=mesh)
        # Each kind's step as a run builds it (`jaxft.tasks`), from the presetless recipes.
        train_steps = {"sft": SFT.build_train_step(_setup("sft", chunk_size, **kw)),
                 "sft_full_logits": SFT.build_train_step(_setup("sft", 0, **kw)),
                 "dpo": DPO.build_train_step(_setup("dpo", chunk_size, **kw), Reference("table", table, replicated)),
                 "dpo_reference": DPO.build_train_step(_setup("dpo", chunk_size, **kw),
                                                       Reference("policy", reference, ref_shardings))}

        def jax_cases(host: dict) -> dict[str, Case]:
            batch = {k: jax.device_put(v, rows_sharding if v.ndim == 2 else replicated) for k, v in host.items()}
            sft_batch = {k: batch[k] for k in ROW_KEYS}
            cases = {name: _jax_case(step, holder, sft_batch if name.startswith("sft") else batch)
                     for name, step in train_steps.items()}
            if lora_cases:
                cases.update(lora_cases(sft_batch, batch))
            return cases

        for length in lengths:
            host = bench_batch(batch_size, length, cfg.vocab_size)
            report["batch"][str(length)] = batch_counts(host)
            cases = jax_cases(host)
            for library, other in others.items():  # after jaxft's, in the same rounds: alternating
                for name, fn in other.cases(host).items():
                    cases[f"{library}/{name}"] = _host_case(fn)
            _measure_length(report, length, cases, cfg=cfg, batch_size=batch_size, kinds=kinds, steps=steps,
                            rounds=rounds, peak_flops=peak_flops)
            # A long bench that is stopped keeps what it measured: each length's table as it ends.
            log.info("bench: %d tokens:\n%s", length, "\n".join(_format_length(report, str(length))))

    first, last = str(lengths[0]), str(lengths[-1])
    report.update(report["lengths"][first])  # top-level entries: the first length
    report["scaling"] = _scaling(report["lengths"], first, last, kinds)
    for library, other in others.items():
        theirs = report["compare"][library]
        theirs.update(theirs["lengths"][first])
        theirs["scaling"] = _scaling(theirs["lengths"], first, last, ("sft", "dpo_reference"))
        theirs["library"] = other.description
    device = jax.devices()[0]
    report["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    report["config"] = {
        "preset": preset, "batch_size": batch_size, "lengths": lengths, "steps": steps, "rounds": rounds,
        "settings": settings,
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                "num_heads", "num_kv_heads", "tie_word_embeddings", "scan_layers",
                                                "remat")}
        | {"head_dim": cfg.dim_per_head, "num_params": cfg.num_params(),
           "param_dtype": dtype_name(cfg.param_dtype), "compute_dtype": dtype_name(cfg.compute_dtype)},
    }
    return report


def _scaling(by_length: dict, first: str, last: str, kinds) -> dict:
    """{kind: tokens/s at the longest length / at the shortest} (1.0 = no cost growth)."""
    return {k: by_length[last][k]["tokens_per_sec"] / by_length[first][k]["tokens_per_sec"] for k in kinds}


_LABELS = {"sft": "sft", "sft_full_logits": "sft_full_logits (whole logits)", "dpo": "dpo (precomputed reference)",
           "dpo_reference": "dpo_reference (reference forward)", "sft_lora": "sft_lora (LoRA, frozen base)",
           "dpo_lora": "dpo_lora (LoRA, reference = adapters off)"}


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def _format_length(report: dict, length: str) -> list[str]:
    """Markdown lines of one length: jaxft's kinds, then each compared library's table."""
    row, batch = report["lengths"][length], report["batch"][length]
    out = ["", f"### {length} tokens", "",
           f"{batch['real_tokens']:,} real tokens of {batch['positions']:,} positions "
           f"({100 * batch['real_tokens'] / batch['positions']:.0f}%), {batch['trained_tokens']:,} in the loss; "
           "tokens/s counts positions", "",
           "| step | ms/step | tokens/s | x sft | MFU | first call s | peak MiB |",
           "|---|---|---|---|---|---|---|"]
    for name, r in row.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        out.append(f"| {_LABELS[name]} | {1000 * r['step_time']:,.1f} | {r['tokens_per_sec']:,.0f} | "
                   f"{r['ratio_to_sft']:.2f} | {mfu} | {r['compile_s']:.1f} | {_mib(r['peak_bytes'])} |")
    if "sft_lora" in row:
        out += ["", f"LoRA: the sft_lora step takes {row['sft_lora']['ratio_to_sft']:.2f}x the full sft step "
                    f"({1 / row['sft_lora']['ratio_to_sft']:.2f}x faster); dpo_lora takes "
                    f"{row['dpo_lora']['step_time'] / row['sft_lora']['step_time']:.2f}x sft_lora"]
    for name, theirs in report["compare"].items():
        lib, theirs = LIBRARY_NAMES[name], theirs["lengths"][length]
        out += ["", f"| jaxft step | vs {lib} step | {lib} ms/step | {lib} tokens/s | jaxft tokens/s "
                    f"| jaxft / {lib} |", "|---|---|---|---|---|---|"]
        for kind, vs in VERSUS.items():
            t = theirs[vs]
            out.append(f"| {_LABELS[kind]} | {vs} | {1000 * t['step_time']:,.1f} | {t['tokens_per_sec']:,.0f} "
                       f"| {row[kind]['tokens_per_sec']:,.0f} | {theirs['ratio'][kind]:.2f}x |")
    return out


def format_bench(report: dict) -> str:
    """The report of `run_bench` as Markdown: one table per length (and each compared
    library's beside it), then tokens/s at the longest length relative to the shortest."""
    c, d = report["config"], report["device"]
    m, st = c["model"], c["settings"]
    chunk = st["loss_chunk"]
    words = {method: _chunk_words(chunk[method], st["loss_chunk_size"][method]) for method in chunk}
    loss = words["sft"] if len(set(words.values())) == 1 else " / ".join(f"{k} {v}" for k, v in words.items())
    layers = f"{m['num_layers']} layer{'s' if m['num_layers'] > 1 else ''}"
    out = [f"{c['preset']} ({m['num_params'] / 1e6:.1f}M params, vocabulary {m['vocab_size']:,}, {layers}"
           f"{', tied embeddings' if m.get('tie_word_embeddings') else ''}), batch {c['batch_size']} rows "
           f"right-padded, {d['count']} x {d['kind']}, best of {c['rounds']} rounds",
           f"jaxft settings ({st['source']} without a preset"
           f"{'; flags set ' + ', '.join(st['overridden']) if st['overridden'] else ''}): "
           f"{st['param_dtype']} weights, {st['compute_dtype']} compute, remat {st['remat']}, "
           f"attention {st['attention']} ({st['attention_backend']}), loss: {loss}; sft_full_logits: whole logits"]
    others = {LIBRARY_NAMES[name]: theirs for name, theirs in report["compare"].items()}
    for lib, theirs in others.items():
        out.append(f"{lib}: {theirs['library']}; the same model sizes, batch, padding and loss masks")
    for length in report["lengths"]:
        out += _format_length(report, length)
    if len(report["lengths"]) > 1:
        first, last = list(report["lengths"])[0], list(report["lengths"])[-1]
        out += ["", f"### tokens/s at {last} relative to {first}", "",
                f"| step | jaxft {first} | jaxft {last} | jaxft {last} / {first} |"
                + "".join(f" {lib} {last} / {first} |" for lib in others),
                "|---|---|---|---|" + "---|" * len(others)]
        for kind in report["scaling"]:
            line = (f"| {_LABELS[kind]} | {report['lengths'][first][kind]['tokens_per_sec']:,.0f} | "
                    f"{report['lengths'][last][kind]['tokens_per_sec']:,.0f} | {report['scaling'][kind]:.2f} |")
            vs = VERSUS.get(kind)
            line += "".join(f" {theirs['scaling'][vs]:.2f} ({vs}) |" if vs else " |" for theirs in others.values())
            out.append(line)
    return "\n".join(out)


def _chunk_words(chunk: int, setting: int) -> str:
    """'chunks of 512 tokens (auto)' / 'whole logits' for a resolved loss chunk and its setting."""
    if chunk == 0:
        return "whole logits"
    return f"chunks of {chunk:,} trained tokens{' (auto)' if setting < 0 else ''}"
