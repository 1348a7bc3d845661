"""Verifiable rewards: answer match, a benchmark's judge, regex, length and repetition."""

from __future__ import annotations

import re

import numpy as np

from jaxft.errors import ConfigError
from jaxft.eval.metrics import extract_final_answer, normalize_answer, repetition_ratio
from jaxft.rewards import register

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def _per_completion(score):
    """A reward from score(record, completion) -> float, applied to every completion."""
    def reward(records, completions):
        return np.array([[score(r, c) for c in row] for r, row in zip(records, completions)], np.float64)
    return reward


def reference_answer(record: dict):
    """The record's final answer: its "answer" field, the part after GSM8K's "####" if any."""
    if "answer" not in record:
        raise ConfigError("reward 'answer' needs records with an 'answer' field (the final answer, or GSM8K's "
                          f"solution ending '#### N'); this record has {sorted(record)}")
    answer = str(record["answer"])
    return normalize_answer(answer.rsplit("####", 1)[1] if "####" in answer else answer)


def final_answer(completion: str) -> str | None:
    """What a completion commits to: the last \\boxed{...}, else `extract_final_answer`."""
    boxed = _BOXED_RE.findall(completion)
    return normalize_answer(boxed[-1]) if boxed else extract_final_answer(completion)


@register("answer")
def answer():
    def score(record, completion):
        got = final_answer(completion)
        return float(got is not None and got == reference_answer(record))

    return _per_completion(score)


@register("regex")
def regex(pattern: str, full: bool = False):
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ConfigError(f"reward 'regex': pattern {pattern!r} does not compile: {err}") from err
    match = compiled.fullmatch if full else compiled.search
    return _per_completion(lambda r, c: float(match(c) is not None))


@register("length")
def length(max_words: int):
    if max_words < 1:
        raise ConfigError(f"reward 'length': max_words must be >= 1, got {max_words}")
    return _per_completion(lambda r, c: -max(0, len(c.split()) - max_words) / max_words)


@register("repetition")
def repetition(n: int = 3):
    return _per_completion(lambda r, c: -repetition_ratio([c], n))


@register("benchmark")
def benchmark(benchmark: str):
    from jaxft.eval.benchmarks import EvalSettings, GenerationBenchmark, get_benchmark

    bench = get_benchmark(benchmark, flag="reward 'benchmark'")
    if not isinstance(bench, GenerationBenchmark):
        raise ConfigError(f"reward 'benchmark': {benchmark!r} does not judge completions (use a generation "
                          "benchmark such as gsm8k, math, humaneval or mbpp)")

    def reward(records, completions):
        problems = bench.read(list(records), EvalSettings())
        verdicts = bench.judge(problems, [list(row) for row in completions])
        return np.array([[float(v.correct) for v in row] for row in verdicts], np.float64)

    return reward
