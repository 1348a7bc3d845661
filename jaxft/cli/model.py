"""`jaxft export`, `jaxft generate` and `jaxft eval`: a checkpoint as a Hugging Face folder, and
what such a folder generates and scores."""

from __future__ import annotations

import argparse
import os

from jaxft.cli.common import _positive_int


def _export(argv):
    p = argparse.ArgumentParser(prog="jaxft export", description="write a checkpoint as a Hugging Face folder")
    p.add_argument("workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: latest")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the training param dtype)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge", dest="kind", action="store_const", const="merge",
                      help="LoRA run: a full HF folder, adapters merged into the base (the default)")
    kind.add_argument("--adapter", dest="kind", action="store_const", const="adapter",
                      help="LoRA run: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    a = p.parse_args(argv)
    from jaxft.io.export import export_checkpoint
    from jaxft.io.folders import check_output
    from jaxft.models.config import parse_dtype

    if not os.path.lexists(a.out):  # not under a file (export names what an existing --out is)
        check_output(a.out, "--out", folder=True)
    out = export_checkpoint(a.workdir, a.out, step=a.step, dtype=parse_dtype(a.dtype, key="--dtype"), kind=a.kind)
    print(f"exported to {out}")


def _generate(argv):
    p = argparse.ArgumentParser(prog="jaxft generate", description="sample from a Hugging Face model folder")
    p.add_argument("--model", required=True, help="Hugging Face folder (WORKDIR/hf; a run's WORKDIR means it)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="records with a 'prompt' or 'messages' (an eval data file works): JSONL, JSON, CSV or "
                        "Parquet, .gz / .zst compressed JSONL / JSON / CSV, a folder or a glob, as training reads them")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", type=_positive_int, default=1, metavar="K",
                   help="completions per prompt, from one shared prefill (seeds --seed, --seed + 1, ...)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a completion at this text (not included; repeat for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat template, even if the tokenizer has one")
    a = p.parse_args(argv)
    from jaxft.eval.generation import read_prompts
    from jaxft.inference.generate import generate_cli

    empty = [i for i, text in enumerate(a.prompt, 1) if not text.strip()]
    if empty:
        p.error(f"--prompt number {empty[0]} is empty: give the text to continue")
    prompts = a.prompt + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        p.error("give --prompt TEXT (repeatable) and / or --prompts FILE")
    if a.samples > 1 and a.temperature == 0:
        p.error(f"--samples {a.samples} with --temperature 0: greedy decoding gives the same completion every "
                "time; sample with --temperature > 0")
    if [s for s in a.stop if not s]:
        p.error("--stop needs a non-empty string")
    outputs = generate_cli(a.model, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, chat=False if a.raw else None, samples=a.samples,
                           stop=a.stop, seed=a.seed)
    for prompt, outs in zip(prompts, outputs):
        print(f">>> {prompt if isinstance(prompt, str) else prompt[-1].get('content')}")
        for j, out in enumerate(outs):
            print(f"--- sample {j + 1} of {len(outs)}\n{out}" if len(outs) > 1 else out)
        print()


def _eval(argv):
    p = argparse.ArgumentParser(prog="jaxft eval", description=(
        "evaluate a Hugging Face folder: on a benchmark (--benchmark gsm8k | math | humaneval | mbpp | "
        "repetition | arithmetic | lm_eval:TASK: pass@k and the benchmark's own numbers), or greedy answers "
        "(exact match, repetition ratio) and eval loss on --data, preference accuracy on --pairs"))
    p.add_argument("--model", required=True)
    p.add_argument("--benchmark", default=None, metavar="NAME",
                   help="a registered benchmark (docs/evaluation.md); --data then overrides its data set")
    p.add_argument("--data", default=None, help="without --benchmark: records with an 'answer' field (any data file "
                   "training reads: JSONL, JSON, CSV, Parquet, .gz / .zst); with it: the benchmark's records in its "
                   "public format, a file or a datasets hub name NAME[:CONFIG][:SPLIT]")
    p.add_argument("--pairs", default=None, help="preference pairs (prompt/chosen/rejected)")
    p.add_argument("--reference", default=None, help="reference model for implicit-reward accuracy")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N records")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: 128, or the benchmark's own (gsm8k 512, math 1024, ...)")
    p.add_argument("--max-length", type=int, default=512)
    b = p.add_argument_group("benchmarks (--benchmark)")
    b.add_argument("--samples", type=_positive_int, default=1, help="completions per problem (pass@k for k <= this)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (needs --samples 1)")
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    b.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt through the chat template, or raw text (default: the benchmark's choice, chat "
                        "where the tokenizer has a template)")
    b.add_argument("--few-shot", type=int, default=None, metavar="N", help="worked examples before each problem "
                   "(gsm8k: default 8 raw, 0 chat; math: 4 raw, 0 chat)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=_positive_int, default=16, help="rows sampled together")
    b.add_argument("--json", default=None, metavar="OUT", help="write {benchmark, model, n, metrics, settings}")
    b.add_argument("--samples-out", default=None, metavar="FILE", help="one JSON line per completion: prompt, "
                   "completion, extracted answer, reference, correct, error")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    a = p.parse_args(argv)
    import json

    if a.benchmark is None:
        given = [f for f, v in (("--samples", a.samples != 1), ("--temperature", a.temperature != 0),
                                ("--top-p", a.top_p != 1), ("--top-k", a.top_k != 0),
                                ("--chat / --no-chat", a.chat is not None), ("--few-shot", a.few_shot is not None),
                                ("--json", a.json), ("--samples-out", a.samples_out)) if v]
        if given:
            p.error(f"{given[0]} goes with --benchmark NAME")
        from jaxft.eval.folder import evaluate_folder

        result = evaluate_folder(a.model, a.data, pairs_file=a.pairs, reference_dir=a.reference,
                                 max_new_tokens=a.max_new_tokens or 128, limit=a.limit, max_length=a.max_length)
        print(json.dumps(result, indent=2))
        return
    if a.pairs or a.reference:
        p.error("--pairs / --reference score preference pairs: run them without --benchmark")
    from jaxft.eval.benchmarks.base import EvalSettings
    from jaxft.eval.benchmarks.runner import write_samples
    from jaxft.eval.folder import evaluate_benchmark
    from jaxft.io.folders import check_output

    for flag, path in (("--json", a.json), ("--samples-out", a.samples_out)):
        if path:
            check_output(path, flag, folder=False)
    settings = EvalSettings(data=a.data, limit=a.limit, samples=a.samples, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, max_new_tokens=a.max_new_tokens, chat=a.chat, few_shot=a.few_shot,
                            seed=a.seed, batch_size=a.batch_size)
    result = evaluate_benchmark(a.model, a.benchmark, settings, progress=a.progress)
    summary = json.dumps(result.summary(), indent=2, default=str)
    if a.json:
        from jaxft.io import atomic

        atomic.write_text(a.json, summary + "\n")
    if a.samples_out:
        write_samples(result, a.samples_out)
    print(summary)
