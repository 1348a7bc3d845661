"""Benchmarks during training (`train.eval_benchmarks`): scored every `train.eval_every` steps
and at the end by the same runner as `jaxft eval --benchmark`, logged as `eval/NAME/pass@1`
(and each benchmark's other numbers) in metrics.jsonl, TensorBoard and W&B.

`train.eval_benchmarks` is a comma list of NAME or NAME=DATA ("gsm8k=data/gsm8k_test.jsonl,math");
lm-eval task lists join with "+" there ("lm_eval:arc_easy+hellaswag"), since the comma separates
benchmarks. Greedy, one sample per problem (pass@1), `train.eval_benchmark_limit` problems each.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxft.errors import ConfigError

KEY = "train.eval_benchmarks"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # as get_benchmark takes it ("lm_eval:arc_easy,hellaswag")
    data: str | None


def parse_eval_benchmarks(text: str, *, key: str = f"config key {KEY}") -> list[Entry]:
    """The entries of `train.eval_benchmarks` ("gsm8k=FILE,math" -> [Entry("gsm8k", "FILE"),
    Entry("math", None)]); an unknown name or an empty entry is a ConfigError naming the key
    (or the flag `key` names) and listing the known benchmarks."""
    from jaxft.eval.benchmarks import get_benchmark

    entries = []
    for part in (p.strip() for p in text.split(",")):
        name, eq, data = (s.strip() for s in part.partition("="))
        if not name or (eq and not data):
            raise ConfigError(f"{key}: {text!r}: expected a comma list of NAME or NAME=DATA "
                              '(e.g. "gsm8k=data/gsm8k_test.jsonl,math")')
        name = name.replace("+", ",")
        get_benchmark(name, flag=f"{key}:")  # unknown names fail at start-up, listing the known
        entries.append(Entry(name, data or None))
    return entries


class TrainBenchmarks:
    """The run's benchmarks, their data read and problems built once (bad data fails before the
    first step); `__call__(model)` scores them all: {"eval/NAME/METRIC": value}."""

    def __init__(self, train, tokenizer, *, samples_dir: Path | None = None):
        """train: the run config's train section; samples_dir: where each evaluation's
        completions go (SAMPLES_DIR/NAME/step_N.jsonl), None = nowhere."""
        from jaxft.eval.benchmarks import get_benchmark
        from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark
        from jaxft.eval.benchmarks.runner import prepare

        self.tokenizer, self.samples_dir = tokenizer, samples_dir
        self.items = []
        for entry in parse_eval_benchmarks(train.eval_benchmarks):
            benchmark = get_benchmark(entry.name, flag=f"config key {KEY}:")
            settings = EvalSettings(data=entry.data, limit=train.eval_benchmark_limit or None,
                                    max_new_tokens=train.eval_benchmark_max_new_tokens or None, seed=train.seed)
            try:
                ready = prepare(benchmark, tokenizer, settings) if isinstance(benchmark, GenerationBenchmark) else None
            except ConfigError as err:  # --data / --limit in the runner's words: say which key
                raise ConfigError(f"config key {KEY}: {entry.name}: {err}") from None
            self.items.append((benchmark, settings, ready))

    def __call__(self, model, step: int | None = None) -> dict[str, float]:
        import jax

        from jaxft.eval.benchmarks.runner import score, write_samples

        row = {}
        for benchmark, settings, ready in self.items:
            result = score(ready, model, self.tokenizer) if ready else benchmark.run(model, self.tokenizer, settings)
            row.update({f"eval/{result.benchmark}/{k}": float(v) for k, v in result.metrics.items()})
            if self.samples_dir is not None and result.samples and step is not None and jax.process_index() == 0:
                folder = self.samples_dir / _file_name(result.benchmark)
                folder.mkdir(parents=True, exist_ok=True)
                write_samples(result, folder / f"step_{step}.jsonl")
        return row


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def read_benchmark_metrics(rows: list[dict]) -> dict[str, float]:
    """The last logged value of every eval/NAME/METRIC in a run's metrics rows."""
    out = {}
    for row in rows:
        out.update({k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, float)})
    return out
