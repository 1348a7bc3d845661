"""`jaxft quickstart`: the DeepSeek LLM story (SFT, then DPO) in miniature, on a laptop CPU.

1. writes the bundled arithmetic / word-problem data (jaxft.quickstart.data) to WORKDIR/data;
2. initialises the tiny model (random weights) and saves it as WORKDIR/base;
3. SFT on the instruction data -> WORKDIR/sft (Hugging Face export in WORKDIR/sft/hf);
4. DPO on preference pairs whose rejected answers are wrong or repetitive -> WORKDIR/dpo;
5. evaluates base, SFT and DPO on held-out questions (the `arithmetic` benchmark: GSM8K-style
   scoring through the benchmark runner) and pairs, prints a table and writes
   WORKDIR/results.json. The final model is WORKDIR/dpo/hf.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from jaxft.config import base_config, lock
from jaxft.errors import ConfigError
from jaxft.io import atomic
from jaxft.io.checkpoint import workdir_path
from jaxft.io.folders import check_output

STAGES = ("base", "sft", "dpo")


def _stage_config(model_path: Path, train: Path, eval_: Path, *, steps: int, lr: float, warmup: int):
    """Settings both quickstart stages share: bundled data, 128-token rows, batch 16."""
    c = base_config()
    c.model.path = str(model_path)
    c.data.train, c.data.eval = str(train), str(eval_)
    c.data.max_length = 128
    c.train.steps = steps
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 0
    c.train.save_every = steps
    c.optim.lr = lr
    c.optim.warmup_steps = min(warmup, steps // 10)
    return c


def quickstart_configs(workdir: Path, *, sft_steps: int = 400, dpo_steps: int = 150):
    """(sft config, dpo config) of the quickstart; the configs/quickstart.py file shows them."""
    data = workdir / "data"
    sft = _stage_config(workdir / "base", data / "sft_train.jsonl", data / "sft_eval.jsonl",
                        steps=sft_steps, lr=3e-3, warmup=20)
    sft.data.packing = True
    sft.optim.weight_decay = 0.01

    dpo = _stage_config(workdir / "sft" / "hf", data / "pref_train.jsonl", data / "pref_eval.jsonl",
                        steps=dpo_steps, lr=1e-4, warmup=10)
    dpo.dpo.beta = 0.1
    # DPO + a weighted NLL term on the chosen answers (RPO, Pang et al. 2024; TRL's rpo_alpha;
    # Llama 3's recipe). Plain sigmoid DPO pushes the rejected answers down so hard on this
    # tiny model that it also lowers the chosen ones and exact match drops (likelihood
    # displacement): try --config.dpo.loss_type=sigmoid to see it.
    dpo.dpo.loss_type = "sigmoid,sft"
    dpo.dpo.loss_weights = "1.0,1.0"
    dpo.dpo.reference = "policy"
    dpo.dpo.precompute_reference = True
    return lock(sft), lock(dpo)


def write_base_model(folder: Path, *, seed: int = 0) -> Path:
    """The tiny preset with random weights, saved with the bundled tokenizer."""
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.models import create_model, save_hf
    from jaxft.models.from_config import model_config

    config = base_config()
    config.model.preset = "tiny"
    config.train.seed = seed
    tokenizer = load_bundled_tokenizer()
    cfg = model_config(config, tokenizer)
    with atomic.replace_folder(folder) as tmp:  # a kill leaves no half model that a rerun would take
        save_hf(create_model(cfg, seed=seed), tmp, tokenizer=tokenizer)
    return Path(folder)


def evaluate_stage(model_dir: Path, data: Path, *, num_questions: int, max_length: int) -> dict:
    """Exact match and repetition ratio of greedy answers, and preference accuracy.

    The answers are the `arithmetic` benchmark (`jaxft eval --benchmark arithmetic`): GSM8K's
    scoring (the final number) on the held-out questions, through the runner every benchmark
    uses; exact match is its pass@1."""
    from transformers import AutoTokenizer

    from jaxft.eval.benchmarks import get_benchmark
    from jaxft.eval.benchmarks.base import EvalSettings
    from jaxft.eval.benchmarks.runner import run_generation_benchmark
    from jaxft.eval.likelihood import preference_eval
    from jaxft.models import load_hf

    model = load_hf(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = EvalSettings(data=str(data / "sft_eval.jsonl"), limit=num_questions, max_new_tokens=64, batch_size=50)
    result = run_generation_benchmark(get_benchmark("arithmetic"), model, tokenizer, settings)
    # Per-token (length-normalised) log-probs: summed ones would favour the shorter answer
    # whatever the model, since the repetitive rejected answers are longer.
    pref = preference_eval(model, tokenizer, str(data / "pref_eval.jsonl"), max_length=max_length)
    return {
        "exact_match": result.metrics["pass@1"],
        "repetition_ratio": result.metrics["repetition_ratio"],
        # Share of held-out pairs where the model gives the chosen answer more probability.
        "preference_accuracy": pref["preference_accuracy"],
        "benchmark": {"name": result.benchmark, "n": result.n, "metrics": result.metrics},
        "samples": [{"prompt": r["prompt"], "output": r["completion"], "answer": r["reference"],
                     "extracted": r["extracted"]} for r in result.samples[:3]],
    }


def format_table(results: dict) -> str:
    lines = ["| model | exact match | repetition ratio | preference accuracy |", "|---|---|---|---|"]
    for stage in STAGES:
        if stage in results:
            r = results[stage]
            lines.append(f"| {stage} | {100 * r['exact_match']:.1f}% | {100 * r['repetition_ratio']:.1f}% | "
                         f"{100 * r['preference_accuracy']:.1f}% |")
    return "\n".join(lines)


QUICKSTART_ENTRIES = ("data", "base", "sft", "dpo", "results.json")  # what a quickstart folder holds


def _check_quickstart_folder(workdir: Path) -> None:
    """Raises unless `workdir` is missing, empty or an earlier quickstart's folder (rerun: resumes)."""
    if not workdir.exists():
        check_output(workdir, "--workdir", folder=True)  # not under a file
        return
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a new folder for the quickstart")
    entries = [p.name for p in workdir.iterdir() if not p.name.startswith(".")]
    if entries and not any(name in QUICKSTART_ENTRIES for name in entries):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--workdir {workdir} is a non-empty folder that is not a quickstart's ({shown}); "
                         "the quickstart writes data/, base/, sft/ and dpo/ there: give a new or empty folder")


def run_quickstart(workdir: str | Path = "jaxft_quickstart", *, sft_steps: int = 400, dpo_steps: int = 150,
                   num_questions: int = 200, seed: int = 0, log=print) -> dict:
    """Runs the whole quickstart; returns {stage: metrics} plus timings. Reruns resume."""
    from jaxft.quickstart.data import write_quickstart_data
    from jaxft.run import run

    workdir = workdir_path(workdir)
    _check_quickstart_folder(workdir)
    start = time.perf_counter()
    data = workdir / "data"
    write_quickstart_data(data, seed=seed)
    if not (workdir / "base" / "config.json").is_file():
        write_base_model(workdir / "base", seed=seed)
    sft_cfg, dpo_cfg = quickstart_configs(workdir, sft_steps=sft_steps, dpo_steps=dpo_steps)
    timings = {}
    log(f"[1/3] SFT: {sft_steps} steps on {sft_cfg.data.train}")
    t = time.perf_counter()
    run(sft_cfg, workdir / "sft", kind="sft")
    timings["sft_seconds"] = time.perf_counter() - t
    log(f"[2/3] DPO: {dpo_steps} steps on {dpo_cfg.data.train}")
    t = time.perf_counter()
    run(dpo_cfg, workdir / "dpo", kind="dpo")
    timings["dpo_seconds"] = time.perf_counter() - t
    log("[3/3] evaluating base, SFT and DPO models on held-out questions and pairs")
    t = time.perf_counter()
    results = {}
    for stage, folder in (("base", workdir / "base"), ("sft", workdir / "sft" / "hf"), ("dpo", workdir / "dpo" / "hf")):
        results[stage] = evaluate_stage(folder, data, num_questions=num_questions, max_length=sft_cfg.data.max_length)
    timings["eval_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - start
    results["timings"] = timings
    results["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    atomic.write_text(workdir / "results.json", json.dumps(results, indent=2))
    log("\n" + format_table(results))
    log(f"\nwall time {timings['total_seconds']:.0f} s (SFT {timings['sft_seconds']:.0f} s, DPO "
        f"{timings['dpo_seconds']:.0f} s, eval {timings['eval_seconds']:.0f} s); fine-tuned model: {workdir / 'dpo' / 'hf'}")
    return results
