"""`lm_eval:TASK[,TASK...]`: any lm-evaluation-harness task, scored on jaxft's forward pass and
sampler (`jaxft.eval.lm_model.JaxftLM`) through `lm_eval.simple_evaluate`.

`--data DIR` (settings.data) adds a folder of task YAML files (lm-eval's `--include_path`; a
YAML file stands for its folder; several folders joined by os.pathsep) to lm-eval's own tasks,
so a task whose dataset is a local JSONL (`dataset_path: json`, `dataset_kwargs: {data_files:
...}`) runs offline. `--limit` and `--few-shot` are lm-eval's `limit` and `num_fewshot`;
`--chat` applies the tokenizer's chat template (few-shot examples as turns); `--temperature`,
`--top-p`, `--top-k` and `--max-new-tokens` override the generation settings of generate_until
tasks when set (temperature > 0, top_p < 1, top_k > 0, max_new_tokens given), the task's own
otherwise.

Metrics are "TASK/METRIC" for lm-eval's "METRIC,none" (e.g. "arc_easy/acc", "arc_easy/acc_norm",
"arc_easy/acc_stderr") and "TASK/METRIC,FILTER" for other filters ("gsm8k/exact_match,
strict-match"); groups the same way. `n` is the number of documents scored, summed over tasks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from jaxft.errors import ConfigError, PathError
from jaxft.eval.benchmarks import register_prefix
from jaxft.eval.benchmarks.base import BenchmarkResult, EvalSettings


def include_paths(data: str | None) -> list[str] | None:
    """Task folders named by --data: folders, or YAML files standing for their folder."""
    if not data:
        return None
    paths = []
    for part in str(data).split(os.pathsep):
        path = Path(part).expanduser()
        if not path.exists():
            raise PathError(f"--data {part}: no such task folder (lm_eval:TASK reads task YAML files from it)")
        paths.append(str(path.parent if path.is_file() else path))
    return paths


def gen_kwargs(settings: EvalSettings) -> dict | None:
    """The generation settings that override the tasks' own: only those set away from default."""
    out: dict = {}
    if settings.temperature > 0:
        out.update(do_sample=True, temperature=settings.temperature)
    if settings.top_p < 1:
        out["top_p"] = settings.top_p
    if settings.top_k > 0:
        out["top_k"] = settings.top_k
    if settings.max_new_tokens is not None:
        out["max_gen_toks"] = settings.max_new_tokens
    return out or None


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": x, "alias": ...}}, "groups": ...} ->
    {"task/acc": x, ...}: numbers only (lm-eval writes "N/A" for a missing stderr)."""
    out = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for key, value in values.items():
                if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric},{filt}"
                out[name] = float(value)
    return out


def _plain(value):
    """A JSON-ready copy (lm-eval's samples hold tuples, numpy numbers, ...)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def flat_samples(results: dict) -> list[dict]:
    """One dict per scored document: task, doc_id, prompt (the first request's context),
    completion (a generated text as sampled; for log-likelihood requests, one [log p, is_greedy]
    per request, [log p] for a rolling one), extracted (a generated text after the task's filter,
    e.g. its regex), reference (lm-eval's target), correct (acc or exact_match where the task has
    one) and every per-document metric."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            metrics = {m: s[m] for m in s.get("metrics", []) if m in s}
            correct = next((metrics[m] for m in ("acc", "exact_match") if m in metrics), None)
            args = (s.get("arguments") or [[None]])[0]
            filtered = s.get("filtered_resps") or []
            generated = bool(filtered) and isinstance(filtered[0], str)
            rows.append(_plain({
                "task": task, "doc_id": s.get("doc_id"), "prompt": args[0] if args else None,
                "completion": s["resps"][0][0] if generated else filtered,
                "extracted": filtered[0] if generated else None, "reference": s.get("target"),
                "correct": None if correct is None else bool(correct), "error": None, "metrics": metrics,
            }))
    return rows


_MANAGERS: dict[tuple, object] = {}  # (folders, with lm-eval's own tasks) -> TaskManager


def _managers(paths: list[str] | None, defaults: bool):
    """The kept TaskManager of these folders (training evaluates every eval_every steps), then,
    if there was one, a fresh one (a task file may have been added since)."""
    from lm_eval.tasks import TaskManager

    key = (tuple(paths or ()), defaults)
    if key in _MANAGERS:
        yield _MANAGERS[key]
    _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults)
    yield _MANAGERS[key]


def task_manager(tasks: tuple[str, ...], paths: list[str] | None, *, flag: str):
    """(lm-eval's TaskManager, the task names with globs expanded) for `tasks`: over the --data
    folders alone when they hold every task by name (indexing lm-eval's ~15,000 built-in YAMLs
    takes seconds), else over lm-eval's tasks and the folders. Unknown names are a ConfigError."""
    if paths:
        for own in _managers(paths, False):
            # A group or tag of the folders may list built-in tasks: those need the whole index.
            if all(t in own.all_subtasks for t in tasks):
                return own, list(tasks)
    for manager in _managers(paths, True):
        names, unknown = [], []
        for t in tasks:
            found = [t] if Path(t).is_file() else manager.match_tasks([t])
            names += found
            unknown += [] if found else [t]
        if not unknown:
            return manager, list(dict.fromkeys(names))
    where = f" or in {', '.join(paths)}" if paths else " (a folder of your own task YAMLs: --data DIR)"
    raise ConfigError(f"--benchmark {flag}: no lm-eval task {', '.join(unknown)} among lm-eval's{where}")


@dataclasses.dataclass(frozen=True)
class LmEvalBenchmark:
    """lm-evaluation-harness tasks by name (its own, or those of the --data folders)."""

    tasks: tuple[str, ...]
    bootstrap_iters: int = 100_000  # lm-eval's stderr of non-mean metrics (0: none)

    @property
    def name(self) -> str:
        return "lm_eval:" + ",".join(self.tasks)

    def check(self, settings: EvalSettings):
        """(TaskManager, task names) for `settings`, or the ConfigError a run would raise: `jaxft
        eval` calls it before any weights load."""
        if settings.samples != 1:
            raise ConfigError(f"--samples {settings.samples}: lm_eval tasks set their own repeats; use --samples 1")
        return task_manager(self.tasks, include_paths(settings.data), flag=self.name)

    def run(self, model, tokenizer, settings: EvalSettings) -> BenchmarkResult:
        import lm_eval

        from jaxft.eval.lm_model import JaxftLM

        manager, names = self.check(settings)
        lm = JaxftLM(model=model, tokenizer=tokenizer, batch_size=settings.batch_size, seed=settings.seed)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=settings.limit,
            num_fewshot=settings.few_shot, apply_chat_template=bool(settings.chat),
            gen_kwargs=gen_kwargs(settings), log_samples=True, bootstrap_iters=self.bootstrap_iters,
            random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed)
        n = sum(int(v.get("effective", 0)) for v in (out.get("n-samples") or {}).values())
        metrics = {k: v for k, v in flat_metrics(out).items() if not math.isnan(v)}
        return BenchmarkResult(benchmark=self.name, n=n, metrics=metrics,
                               settings=dataclasses.asdict(settings), samples=flat_samples(out))


def make(args: str) -> LmEvalBenchmark:
    tasks = tuple(t.strip() for t in args.split(",") if t.strip())
    if not tasks:
        raise ConfigError("--benchmark lm_eval:TASK[,TASK...] needs at least one task name")
    return LmEvalBenchmark(tasks)


register_prefix("lm_eval", make)
