"""Benchmarks by name: `get_benchmark("gsm8k")`, `get_benchmark("lm_eval:arc_easy,hellaswag")`.

Each benchmark is a small module that calls `register` (generation benchmarks) or
`register_prefix` (families of tasks named `PREFIX:ARGS`, e.g. lm-eval's); importing this
package imports them all.
"""

from __future__ import annotations

from typing import Callable

from jaxft.errors import ConfigError
from jaxft.eval.benchmarks.base import (  # noqa: F401
    Benchmark, BenchmarkResult, EvalSettings, GenerationBenchmark, Problem, Verdict, pass_at_k,
)

BENCHMARKS: dict[str, Benchmark] = {}
PREFIXES: dict[str, Callable[[str], Benchmark]] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def register_prefix(prefix: str, make: Callable[[str], Benchmark]) -> None:
    PREFIXES[prefix] = make


def get_benchmark(name: str, *, flag: str = "--benchmark") -> Benchmark:
    prefix, sep, args = name.partition(":")
    if sep and prefix in PREFIXES:
        return PREFIXES[prefix](args)
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    known = sorted(BENCHMARKS) + [f"{p}:TASK" for p in sorted(PREFIXES)]
    raise ConfigError(f"{flag} {name!r}: no such benchmark; known: {', '.join(known)}")


def _import_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "results", "runner"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
