"""`jaxft eval`: a Hugging Face folder scored on questions with answers and on preference pairs
(`evaluate_folder`), or on a named benchmark (`evaluate_benchmark`: gsm8k, math, humaneval, ...)."""

from __future__ import annotations

from jaxft.errors import ConfigError
from jaxft.eval.generation import check_local_source, evaluate_generation, read_jsonl
from jaxft.eval.likelihood import eval_loss, preference_eval
from jaxft.inference.generate import load_folder


def _has_reference_answer(record: dict) -> bool:
    """Whether a record carries a full reference answer (not just the final number)."""
    messages = record.get("messages") or []
    return bool(record.get("completion") or record.get("text")
                or (messages and messages[-1].get("role") == "assistant"))


def evaluate_folder(model_dir: str, data_file: str | None = None, *, pairs_file: str | None = None,
             reference_dir: str | None = None, max_new_tokens: int = 128, limit: int | None = None,
             batch_size: int = 16, max_length: int = 512) -> dict:
    """`jaxft eval`: loads an HF folder (model + tokenizer; a run's workdir stands for its export
    WORKDIR/hf); on `data_file` (JSONL with "answer" fields) reports eval loss, exact match,
    repetition ratio and samples; on `pairs_file` (preference data) the preference accuracy
    (against `reference_dir` too). Bad records fail before any model loads, naming their line."""
    from jaxft.io.folders import model_folder
    from jaxft.models import load_hf

    if not data_file and not pairs_file:
        raise ConfigError("jaxft eval needs --data (questions with answers) and/or --pairs (preference pairs)")
    if reference_dir and not pairs_file:
        raise ConfigError("--reference scores preference pairs against a reference model: give --pairs too")
    # Files are checked before any model loads (a run's workdir means its export, WORKDIR/hf).
    reference_dir = model_folder(reference_dir, flag="--reference") if reference_dir else None
    records = read_jsonl(check_local_source(data_file, "--data"), limit) if data_file else None
    if pairs_file:  # read as training reads it (make_eval_batches): any file, folder or glob
        check_local_source(pairs_file, "--pairs")
    model, tokenizer = load_folder(model_dir, flag="--model")
    out = {}
    if data_file:
        out.update(evaluate_generation(model, tokenizer, records, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size))
        if all(_has_reference_answer(r) for r in records):  # else there is nothing to score a loss on
            out.update(eval_loss(model, tokenizer, data_file, max_length=max_length, batch_size=batch_size,
                                 limit=limit))
    if pairs_file:
        reference = load_hf(reference_dir) if reference_dir else None
        out.update(preference_eval(model, tokenizer, pairs_file, reference=reference, max_length=max_length,
                                   batch_size=batch_size))
    return out


def evaluate_benchmark(model_dir: str, benchmark: str, settings=None, *, progress: bool = False):
    """`jaxft eval --model DIR --benchmark NAME`: a `BenchmarkResult` (`.summary()` is what --json
    writes, `.samples` what --samples-out writes). The benchmark's name, data and settings are
    checked before the weights load (the tokenizer first: the prompts depend on its chat
    template). settings: an `EvalSettings` (default: the benchmark's defaults)."""
    import transformers

    from jaxft.eval.benchmarks import GenerationBenchmark, get_benchmark
    from jaxft.eval.benchmarks.base import EvalSettings
    from jaxft.eval.benchmarks.runner import prepare, score
    from jaxft.io.folders import model_folder
    from jaxft.models import load_hf

    settings = settings or EvalSettings()
    bench = get_benchmark(benchmark)
    if not isinstance(bench, GenerationBenchmark):  # lm_eval:TASK reads its own data
        if hasattr(bench, "check"):  # its task names and settings, before the weights load
            bench.check(settings)
        model, tokenizer = load_folder(model_dir, flag="--model")
        result = bench.run(model, tokenizer, settings)
    else:
        folder = model_folder(model_dir, flag="--model")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError):
            load_folder(model_dir, flag="--model")  # raises the error that names the folder and the file
            raise
        ready = prepare(bench, tokenizer, settings)
        result = score(ready, load_hf(folder), tokenizer, progress=progress)
    result.model = str(model_dir)
    return result
