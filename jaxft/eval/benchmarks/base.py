"""What a benchmark is: the records it reads, the problems it poses, how one completion is judged,
and the settings and result every benchmark shares (`jaxft eval --benchmark NAME`).

Two kinds of benchmark implement `Benchmark.run`: generation benchmarks (gsm8k, math, humaneval,
mbpp, repetition), which are `GenerationBenchmark`s run by one runner (sample k completions per
problem, judge each, pass@k), and `lm_eval:TASK`, which hands jaxft to lm-evaluation-harness.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

from jaxft.eval.benchmarks.results import BenchmarkResult, pass_at_k  # noqa: F401 (public here)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark question, ready to sample.

    id: the benchmark's own id (HumanEval's task_id) or the record's index.
    prompt: a message list (completed under the chat template) or a string (completed as raw
      text); `chat_prompt` / `raw_prompt` say which the benchmark builds, the runner picks.
    reference: what `judge` compares a completion with (a final number, a test program, ...).
    record: the record as read, for --samples-out.
    """

    id: str
    prompt: str | list[dict]
    reference: Any
    record: dict = dataclasses.field(default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How one completion fared: the answer read out of it, whether it is right, and why not."""

    extracted: str | None
    correct: bool
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The knobs of `jaxft eval --benchmark` (and `train.eval_benchmarks`); None = the benchmark's
    default. `samples` completions per problem feed pass@k for every k <= samples."""

    data: str | None = None
    limit: int | None = None
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int | None = None
    chat: bool | None = None
    few_shot: int | None = None
    seed: int = 0
    batch_size: int = 16


class Benchmark(Protocol):
    name: str

    def run(self, model, tokenizer, settings: EvalSettings) -> BenchmarkResult:
        """Scores `model` (a jaxft Decoder) with `tokenizer`."""
        ...


@dataclasses.dataclass(frozen=True)
class GenerationBenchmark:
    """A benchmark scored on sampled completions.

    read(records, settings) -> problems: maps the benchmark's public record format (and the
      few-shot examples where it defines them, `settings.few_shot`) to Problems; records whose
      fields are missing are a DataError naming the record and field.
    judge(problems, completions) -> verdicts: completions[i] are problem i's k completions;
      batched so that code benchmarks can run many programs at once.
    default_data: a `datasets` hub name ("openai/gsm8k:main:test") or a shipped file; --data
      overrides it. stop: strings that end a raw-text completion (HumanEval's "\\ndef", ...).
    scored: whether verdicts mean right / wrong (pass@k reported); False for `repetition`.
    metrics(problems, completions, sampled) -> {name: value}: the benchmark's own numbers
      beside pass@k (`repetition_ratio`); `sampled` holds the sampler's Completions (token ids).
    """

    name: str
    description: str
    read: Callable[[Sequence[dict], EvalSettings], list[Problem]]
    judge: Callable[[Sequence[Problem], Sequence[Sequence[str]]], list[list[Verdict]]]
    default_data: str | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 512
    chat: bool = True  # the default of --chat / --no-chat
    scored: bool = True
    few_shot: tuple[int, int] | None = None  # the default of --few-shot with (chat, raw) prompts, for the report
    metrics: Callable[[Sequence[Problem], Sequence[Sequence[str]], Sequence[Sequence[Any]]], dict] | None = None

    def run(self, model, tokenizer, settings: EvalSettings) -> BenchmarkResult:
        from jaxft.eval.benchmarks.runner import run_generation_benchmark

        return run_generation_benchmark(self, model, tokenizer, settings)
