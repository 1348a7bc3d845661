"""The one runner of generation benchmarks: records -> problems -> k completions each -> verdicts
-> pass@k (`jaxft eval --benchmark`, `train.eval_benchmarks`, the quickstart).

`run_generation_benchmark` is `prepare` (read the records, build the problems: every data error
before any sampling) then `score` (sample, judge, count). Training prepares once and scores at
every evaluation; the CLI does both at once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from jaxft.errors import ConfigError
from jaxft.eval.benchmarks.results import BenchmarkResult, pass_at_k

SampleFn = Callable[..., list]  # jaxft.inference.sampler.sample_completions' signature


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A benchmark's problems, ready to score: `settings` with chat / max_new_tokens / limit
    resolved (what --json reports), `source` the data it read."""

    benchmark: Any  # a GenerationBenchmark (base imports this module: no import of it here)
    problems: list  # Problems
    settings: Any  # EvalSettings
    source: str


def pass_at_ks(samples: int) -> list[int]:
    """The k of the pass@k a run of `samples` completions per problem reports: 1, each power of
    2 below `samples`, and `samples` itself (1 -> [1]; 10 -> [1, 2, 4, 8, 10])."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def pass_at_k_metrics(correct: Sequence[Sequence[bool]], samples: int) -> dict[str, float]:
    """{"pass@k": mean over problems of Chen et al.'s unbiased estimator} for each k of
    `pass_at_ks(samples)`; correct[i]: problem i's verdicts, `samples` of them."""
    out = {}
    for k in pass_at_ks(samples):
        scores = [pass_at_k(len(c), sum(map(bool, c)), k) for c in correct]
        out[f"pass@{k}"] = sum(scores) / len(scores) if scores else 0.0
    return out


def resolve_chat(benchmark, tokenizer, chat: bool | None) -> bool:
    """--chat / --no-chat, else the benchmark's default (chat only where the tokenizer has a
    chat template: a base model's raw prompt otherwise)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return benchmark.chat and has_template
    if chat and not has_template:
        raise ConfigError(f"--chat: this tokenizer has no chat template; evaluate {benchmark.name} with "
                          "--no-chat (raw prompts)")
    return chat


def read_benchmark_records(source: str, limit: int | None = None) -> tuple[list[dict], str]:
    """The first `limit` records of `source` and where they came from: a local file, folder or
    glob (JSONL, JSON, CSV, Parquet, compressed; `jaxft.data.sources`), or a `datasets` hub
    name "NAME[:CONFIG][:SPLIT]" (split default "test": "openai/gsm8k:main:test"). A line that is
    not JSON names its file and line; a missing file or unreachable hub name names the source."""
    from jaxft.data.data_error import DataError
    from jaxft.data.sources import looks_local, read_records

    if looks_local(source):
        records = []
        for location, record in read_records(source):
            if limit and len(records) >= limit:
                break
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(location, f"expected a JSON object, got {type(record).__name__}")
            records.append({**record, "_location": location})
        display = source
    else:
        name, config, split = parse_hub_name(source)
        display = f"{name}[{config + ':' if config else ''}{split}]"
        records = [{**r, "_location": f"{display} index {i}"} for i, r in enumerate(_hub_records(name, config, split, limit))]
    if not records:
        raise DataError(source, "no records (an empty file?)")
    return records, display


def parse_hub_name(source: str) -> tuple[str, str | None, str]:
    """"NAME[:CONFIG][:SPLIT]" -> (name, config or None, split): "openai/gsm8k:main:test" ->
    ("openai/gsm8k", "main", "test"); "HuggingFaceH4/MATH-500" -> (..., None, "test"). A second
    part that is a split name ("test", "train", "validation") is the split."""
    parts = source.split(":")
    if len(parts) > 3 or not all(parts):
        raise ConfigError(f"--data {source!r}: a hub dataset is NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        splits = ("test", "train", "validation", "dev")
        return (parts[0], None, parts[1]) if parts[1].split("[")[0] in splits else (parts[0], parts[1], "test")
    return parts[0], None, "test"


def _hub_records(name: str, config: str | None, split: str, limit: int | None) -> list[dict]:
    from jaxft.data.data_error import DataError

    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown repo, bad config or split: all the same to the user
        raise DataError(name, f"not a local file, and not a hub dataset that could be loaded "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def prepare(benchmark, tokenizer, settings) -> Prepared:
    """Reads the benchmark's records (settings.data, else its default_data) and builds its
    problems; resolves chat (--chat / --no-chat, else the benchmark's default where the tokenizer
    has a template), max_new_tokens and few_shot (where the benchmark declares its default). Every
    bad record fails here, naming where it is."""
    source = settings.data or benchmark.default_data
    if not source:
        raise ConfigError(f"--data: the {benchmark.name} benchmark has no default data set; give --data FILE")
    if settings.limit is not None and settings.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {settings.limit}")
    if settings.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {settings.samples}")
    if settings.samples > 1 and settings.temperature == 0:
        raise ConfigError(f"--samples {settings.samples} with --temperature 0: greedy decoding gives the same "
                          "completion every time, so pass@k would equal pass@1; sample with --temperature > 0 "
                          "(0.8 with --top-p 0.95 is the usual pass@k setting) or use --samples 1")
    if settings.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: off), got {settings.top_k}")
    records, display = read_benchmark_records(source, settings.limit)
    chat = resolve_chat(benchmark, tokenizer, settings.chat)
    max_new = settings.max_new_tokens or benchmark.max_new_tokens
    if max_new < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new}")
    few_shot = settings.few_shot
    if few_shot is None and benchmark.few_shot:
        few_shot = benchmark.few_shot[0 if chat else 1]
    resolved = dataclasses.replace(settings, data=source, chat=chat, max_new_tokens=max_new, few_shot=few_shot)
    problems = benchmark.read(records, resolved)
    return Prepared(benchmark, problems, resolved, display)


def score(prepared: Prepared, model, tokenizer, *, sample_fn: SampleFn | None = None,
          progress: bool = False) -> BenchmarkResult:
    """Samples `settings.samples` completions of every problem (raw prompts end at the benchmark's
    stop strings as well as EOS, chat prompts at EOS), judges them and reports
    pass@k for k in 1, 2, 4, ... up to samples (`pass_at_ks`), `truncated` (the share of
    completions that ran into max_new_tokens) and the benchmark's own metrics.
    sample_fn: the sampler (default `jaxft.inference.sampler.sample_completions`)."""
    benchmark, problems, s = prepared.benchmark, prepared.problems, prepared.settings
    if sample_fn is None:
        from jaxft.inference.completions import sample_completions as sample_fn
    # Stop strings end raw-text completions (the next few-shot "Question:", HumanEval's "\ndef"); a
    # chat answer ends at its end-of-turn token, and may hold them (a whole function in a code block).
    stop = () if s.chat else tuple(benchmark.stop)
    grouped = sample_fn(model, tokenizer, [p.prompt for p in problems], samples=s.samples,
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                        stop=stop, chat=s.chat, seed=s.seed, batch_size=s.batch_size, progress=progress)
    if len(grouped) != len(problems) or any(len(g) != s.samples for g in grouped):
        raise RuntimeError(f"the sampler returned {[len(g) for g in grouped][:8]}... completions for "
                           f"{len(problems)} problems x {s.samples} samples")
    texts = [[cut_at_stop(c.text, stop) for c in group] for group in grouped]
    verdicts = benchmark.judge(problems, texts)
    metrics = pass_at_k_metrics([[v.correct for v in vs] for vs in verdicts], s.samples) if benchmark.scored else {}
    finishes = [c.finish_reason for group in grouped for c in group]
    metrics["truncated"] = sum(f == "length" for f in finishes) / max(len(finishes), 1)
    if benchmark.metrics is not None:
        metrics.update(benchmark.metrics(problems, texts, grouped))
    samples = [
        {"problem": p.id, "sample": j, "prompt": p.prompt, "completion": text, "extracted": v.extracted,
         "reference": _plain(p.reference), "correct": v.correct, "error": v.error,
         "finish_reason": c.finish_reason}
        for p, group, row, vs in zip(problems, grouped, texts, verdicts)
        for j, (c, text, v) in enumerate(zip(group, row, vs))
    ]
    settings = {**dataclasses.asdict(s), "data": prepared.source, "stop": list(stop)}
    return BenchmarkResult(benchmark.name, len(problems), metrics, settings, samples)


def run_generation_benchmark(benchmark, model, tokenizer, settings, *,
                             sample_fn: SampleFn | None = None, progress: bool = False) -> BenchmarkResult:
    """Scores `model` (a jaxft Decoder) with `tokenizer` on `benchmark` (a GenerationBenchmark) with
    `settings` (an EvalSettings): `prepare` then `score`."""
    return score(prepare(benchmark, tokenizer, settings), model, tokenizer, sample_fn=sample_fn,
                 progress=progress)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string (the sampler ends there; this keeps a stop string it
    returned, or one it ran past within a token, out of the judged completion)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _plain(value):
    """A reference as JSON can hold it (numbers and strings stay; anything else as its str)."""
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def write_samples(result: BenchmarkResult, path: str | os.PathLike) -> None:
    """--samples-out: one JSON line per completion (problem, sample, prompt, completion,
    extracted, reference, correct, error, finish_reason)."""
    import json

    from jaxft.io import atomic

    atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.samples))
