"""`jaxft bench --generate`: sampler throughput, jaxft's against transformers' `generate`, side by
side in one process on the same weights and prompts.

The model is a preset's architecture with random weights: transformers builds it from jaxft's
config (`config_to_hf`, SDPA attention, seed 0) and saves it, and jaxft loads that folder, so
both sample from the very same numbers. B prompts of random tokens (lengths spread evenly from
`prompt_length` down to half of it) are decoded to exactly N new tokens (no EOS: every row runs
to N), greedily unless `temperature` > 0:
  jaxft   `jaxft.inference.sampler.sample_ids` (what `sample_completions`, `jaxft generate`
          and `jaxft eval` run): one batch of B rows, prefill + chunked `while_loop` decode.
  torch   `model.generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N)` on
          the left-padded batch, under `torch.no_grad()`, with 1 thread or as many as this
          process may use, whichever is faster on a short probe (`_Torch.pick_threads`).
Rounds alternate between the two and the best of each counts; tokens/s = B x N / seconds.
The first jaxft call (compile + one run) and the first torch call are timed apart. With greedy
decoding the report also says how many rows came out token for token alike.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Sequence

import numpy as np

from jaxft.errors import ConfigError, SetupError

log = logging.getLogger(__name__)
COMPARE = ("torch",)


def bench_prompts(batch_size: int, prompt_length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """B prompts of random ids in [3, vocab): lengths from `prompt_length` down to half of it."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(prompt_length, max(1, prompt_length // 2), batch_size).round().astype(int)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class _Torch:
    """A transformers model from jaxft's config (random weights, seed 0) and its `generate`."""

    def __init__(self, cfg, dtype: str):
        try:
            import torch
            import transformers
        except ImportError as err:
            raise SetupError(f"--compare torch needs PyTorch and transformers ({err}); "
                             "pip install torch transformers") from None
        from jaxft.models.config import config_to_hf

        self.torch = torch
        torch.set_num_threads(_threads())
        hf = config_to_hf(cfg)
        hf.pop("architectures", None)
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=getattr(torch, dtype)).eval()
        self.describe = (f"transformers {transformers.__version__} / torch {torch.__version__}, "
                         f"{type(self.model).__name__}, sdpa attention, {dtype}")
        self.description, self.probe = f"{self.describe}, {torch.get_num_threads()} threads", {}

    def pick_threads(self, prompts, *, temperature: float, new_tokens: int = 8) -> None:
        """Runs with the faster of 1 thread and all cores, timed on `new_tokens`: on a busy CPU
        PyTorch's OpenMP threads can wait on each other (2 threads measured 6-9x slower than 1
        on this shared 2-core machine), and the comparison should be with its best."""
        torch = self.torch
        for threads in dict.fromkeys((1, _threads())):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            self.generate(prompts, new_tokens=new_tokens, temperature=temperature)
            self.probe[threads] = time.perf_counter() - start
        best = min(self.probe, key=self.probe.get)
        torch.set_num_threads(best)
        self.description = (f"{self.describe}, {best} thread{'s' * (best > 1)} (faster than "
                            + ", ".join(f"{n}: {s:.1f} s" for n, s in self.probe.items() if n != best)
                            + f" on {new_tokens} tokens)" if len(self.probe) > 1 else f"{self.describe}, {best} thread")

    def generate(self, prompts, *, new_tokens: int, temperature: float, seed: int = 0) -> np.ndarray:
        """[B, N] new tokens of the left-padded batch."""
        torch = self.torch
        P = max(map(len, prompts))
        ids = np.zeros((len(prompts), P), np.int64)
        mask = np.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):], mask[b, P - len(p):] = p, 1
        sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else {"do_sample": False}
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                                      eos_token_id=None, **sampling)
        return out[:, P:].numpy()


def run_generate_bench(*, preset: str = "smollm2_135m", batch_size: int = 16, new_tokens: int = 256,
                       prompt_length: int = 64, rounds: int = 2, dtype: str = "float32", temperature: float = 0.0,
                       layers: int | None = None, compare: Sequence[str] = ()) -> dict:
    """Times jaxft's sampler (and transformers' `generate` with compare=("torch",)) on the same
    model and prompts; returns the JSON-able report

    {"jaxft": {"tokens_per_sec", "seconds", "first_call_s"}, "torch": {..., "library"} (when
     compared), "ratio": jaxft tokens/s / torch's, "greedy_rows_equal": rows alike of B (greedy,
     compared), "config": {preset, batch_size, new_tokens, prompt_lengths, rounds, dtype,
     temperature, num_params, num_layers, threads}, "device": {...}}.
    """
    import jax

    from jaxft.inference import sampler
    from jaxft.models import get_preset, load_hf
    from jaxft.models.config import parse_dtype

    for name in compare:
        if name not in COMPARE:
            raise ConfigError(f"--compare {name!r} with --generate: choose from {', '.join(COMPARE)}")
    if batch_size < 1 or new_tokens < 1 or prompt_length < 1 or rounds < 1:
        raise ConfigError("jaxft bench --generate: batch size, new tokens, prompt length and rounds must be >= 1")
    parse_dtype(dtype, key="--dtype")  # a bad name fails before anything is built
    cfg = get_preset(preset)
    if layers:
        cfg = cfg.with_layers(layers)
    torch_side = _Torch(cfg, dtype) if compare else None
    with tempfile.TemporaryDirectory() as folder:
        if torch_side is not None:
            torch_side.model.save_pretrained(folder)
            model = load_hf(folder)
        else:
            from jaxft.models import create_model

            model = create_model(cfg.replace(param_dtype=parse_dtype(dtype), compute_dtype=parse_dtype(dtype)))
    prompts = bench_prompts(batch_size, prompt_length, cfg.vocab_size)
    tokens = batch_size * new_tokens

    def jaxft_run():
        rows = sampler.sample_ids(model, prompts, max_new_tokens=new_tokens, temperature=temperature, eos_ids=[],
                                  batch_size=batch_size)
        return np.asarray([r[0] for r in rows])

    start = time.perf_counter()
    ours = jaxft_run()
    report = {"jaxft": {"first_call_s": time.perf_counter() - start}}
    log.info("bench --generate: jaxft's first call (compile + run) %.1f s", report["jaxft"]["first_call_s"])
    if torch_side is not None:
        start = time.perf_counter()
        torch_side.generate(prompts, new_tokens=2, temperature=temperature)  # warm-up
        first_call = time.perf_counter() - start
        torch_side.pick_threads(prompts, temperature=temperature)
        report["torch"] = {"first_call_s": first_call, "library": torch_side.description,
                           "threads": torch_side.torch.get_num_threads(), "probe": torch_side.probe}
    best = {"jaxft": float("inf"), "torch": float("inf")}
    theirs = None
    for r in range(rounds):
        start = time.perf_counter()
        ours = jaxft_run()
        best["jaxft"] = min(best["jaxft"], time.perf_counter() - start)
        if torch_side is not None:
            start = time.perf_counter()
            theirs = torch_side.generate(prompts, new_tokens=new_tokens, temperature=temperature)
            best["torch"] = min(best["torch"], time.perf_counter() - start)
        log.info("bench --generate: round %d: best jaxft %.1f s, torch %.1f s", r + 1, best["jaxft"], best["torch"])
    for name, seconds in best.items():
        if name in report:
            report[name].update({"seconds": seconds, "tokens_per_sec": tokens / seconds})
    if torch_side is not None:
        report["ratio"] = report["jaxft"]["tokens_per_sec"] / report["torch"]["tokens_per_sec"]
        if temperature == 0:
            report["greedy_rows_equal"] = int(sum((a == b).all() for a, b in zip(ours, theirs)))
    device = jax.devices()[0]
    report["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    report["config"] = {"preset": preset, "batch_size": batch_size, "new_tokens": new_tokens,
                        "prompt_lengths": [len(p) for p in prompts], "rounds": rounds, "dtype": dtype,
                        "temperature": temperature, "num_params": model.cfg.num_params(),
                        "num_layers": model.cfg.num_layers, "threads": _threads()}
    return report


def format_generate_bench(report: dict) -> str:
    """The report as a few Markdown lines: the setting, then a tokens/s table."""
    c, d = report["config"], report["device"]
    lengths = c["prompt_lengths"]
    sampling = "greedy" if c["temperature"] == 0 else f"temperature {c['temperature']}"
    out = [f"{c['preset']} ({c['num_params'] / 1e6:.1f}M params, {c['num_layers']} layers, random weights, "
           f"{c['dtype']}), batch {c['batch_size']}, prompts {min(lengths)}-{max(lengths)} tokens, "
           f"{c['new_tokens']} new tokens a row ({sampling}, no EOS), {d['count']} x {d['kind']}, "
           f"{c['threads']} CPU threads, best of {c['rounds']} rounds"]
    if "torch" in report:
        out.append(f"torch: {report['torch']['library']}, model.generate on the left-padded batch")
    out += ["", "| sampler | tokens/s | seconds | first call (s) |", "|---|---|---|---|"]
    for name in ("jaxft", "torch"):
        if name in report:
            r = report[name]
            out.append(f"| {name} | {r['tokens_per_sec']:,.1f} | {r['seconds']:.2f} | {r['first_call_s']:.1f} |")
    if "ratio" in report:
        out += ["", f"jaxft / torch tokens/s: {report['ratio']:.2f}x"]
        if "greedy_rows_equal" in report:
            out.append(f"greedy rows token for token equal to transformers': {report['greedy_rows_equal']} of "
                       f"{c['batch_size']}")
    return "\n".join(out)
