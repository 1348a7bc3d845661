"""`jaxft compare DIR...`: runs side by side: a Markdown table, a CSV and a PNG of curves.

Each DIR is a run's workdir (it has metrics.jsonl) or a sweep folder (its runs, in
sweep.json's order). A run's row holds what sets it apart (its sweep overrides, or the config
keys whose values differ between the compared runs), its final train loss, final and best
eval loss, its other final eval metrics (with the benchmarks it scored during training,
`eval/NAME/pass@1`, their last logged values), tokens/s and wall time; with an eval set
(`eval_data` questions with answers, `eval_pairs` preference pairs) also what `jaxft eval` reports
on its export: exact match, repetition ratio, preference accuracy; with `benchmarks` ("gsm8k",
"gsm8k=FILE,math", as train.eval_benchmarks takes them) each benchmark scored greedily on its
export now, as `NAME/pass@1` columns.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Sequence

from jaxft.data.text_files import read_json
from jaxft.errors import DataError, PathError
from jaxft.io import atomic
from jaxft.io.metrics import read_metrics
from jaxft.sweep.runner import RECORD

# Config keys that differ between any two runs without being the experiment.
_NOT_SETTINGS = ("data.cache_dir",)
_GENERATION_KEYS = ("exact_match", "repetition_ratio", "preference_accuracy", "eval_loss")


@dataclasses.dataclass
class Comparison:
    """rows: one dict per run (column -> value); columns in table order."""
    rows: list[dict]
    columns: list[str]
    metric: str
    csv_path: Path | None = None
    png_path: Path | None = None

    def markdown(self) -> str:
        def cell(v):
            if isinstance(v, float):
                return "" if math.isnan(v) else f"{v:.4g}"
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)


def run_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    """The run workdirs among `dirs`: each a workdir, or a sweep folder of them."""
    out = []
    for d in map(Path, dirs):
        if (d / "metrics.jsonl").is_file():
            out.append(d)
        elif (d / "sweep.json").is_file():
            names = [r["name"] for r in _sweep_runs(d / "sweep.json")]
            out += [d / n for n in names if (d / n / "metrics.jsonl").is_file()]
        elif d.is_dir() and (found := sorted(p.parent for p in d.glob("*/metrics.jsonl"))):
            out += found
        else:
            raise PathError(f"{d}: neither a run workdir (metrics.jsonl) nor a folder of runs")
    return out


def _sweep_runs(path: Path) -> list[dict]:
    """The runs a sweep folder's sweep.json lists, or a ValueError naming the file."""
    runs = read_json(path).get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs):
        raise DataError(f"{path}: expected {{\"runs\": [{{\"name\": ...}}, ...]}} as jaxft sweep writes it; "
                         "the file is damaged: rerun the sweep to rewrite it")
    return runs


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _what_differs(workdirs: list[Path]) -> list[dict]:
    """Per run: its sweep overrides, or else its config's values, of the keys whose values
    differ between runs."""
    records = [read_json(w / RECORD) if (w / RECORD).is_file() else None for w in workdirs]
    if all(records):  # the overrides that are not the same for every run (those set the sweep apart)
        overrides = [r["settings"]["overrides"] for r in records]
        keys = list(dict.fromkeys(k for o in overrides for k in o))
        if len(overrides) > 1:
            keys = [k for k in keys if len({json.dumps(o.get(k)) for o in overrides}) > 1]
        return [{k: o.get(k) for k in keys} for o in overrides]
    configs = [_flat(read_json(w / "config.json")) if (w / "config.json").is_file() else {}
               for w in workdirs]
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if k not in _NOT_SETTINGS and len({json.dumps(c.get(k)) for c in configs}) > 1]
    return [{k: c.get(k) for k in differ} for c in configs]


def _summary(workdir: Path, rows: list[dict]) -> dict:
    """A run's summary from its metrics `rows` (and its sweep record in `workdir`)."""
    train = [r for r in rows if isinstance(r.get("loss"), float)]
    evals = [r for r in rows if isinstance(r.get("eval_loss"), float)]
    out = {"steps": train[-1]["step"] if train else 0, "loss": train[-1]["loss"] if train else None}
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        out.update({"eval_loss": evals[-1]["eval_loss"], "best_eval_loss": best["eval_loss"],
                    "best_eval_step": best["step"]})
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval_") and k != "eval_loss"
                    and isinstance(v, float) and k != "eval_num_tokens"})
    for r in rows:  # benchmarks scored during training (train.eval_benchmarks): the last values
        out.update({k: v for k, v in r.items() if k.startswith("eval/") and isinstance(v, float)})
    # The first logged window includes compilation: tokens/s over the ones after it.
    speeds = [r["tokens_per_sec"] for r in train[1:] if isinstance(r.get("tokens_per_sec"), float)]
    out["tokens_per_sec"] = sum(speeds) / len(speeds) if speeds else None
    record = read_json(workdir / RECORD) if (workdir / RECORD).is_file() else {}
    out["wall_s"] = record.get("wall_s")
    return out


def plot_runs(runs_rows: Sequence[list[dict]], names: Sequence[str], metric: str, out: Path) -> Path:
    """A PNG of `metric` against step, one line per run (`runs_rows`: each run's metrics rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rows, name in zip(runs_rows, names):
        pts = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), float)]
        if pts:
            ax.plot(*zip(*pts), "o-" if len(pts) < 20 else "-", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic.write_bytes(out, image.getvalue())
    return out


def compare(dirs: Sequence[str | Path], *, metric: str | None = None, out_dir: str | Path | None = None,
            eval_data: str | None = None, eval_pairs: str | None = None, max_new_tokens: int = 64,
            limit: int | None = None, benchmarks: str | None = None) -> Comparison:
    """Compares the runs under `dirs` (see the module docstring); writes OUT/compare.csv and
    OUT/compare.png (OUT: `out_dir`, default the first DIR when it is a sweep folder, else its
    parent). metric: the curve to plot (default eval_loss when any run has it, else loss)."""
    if benchmarks:  # unknown names fail before any run is read
        from jaxft.eval.train_benchmarks import parse_eval_benchmarks

        entries = parse_eval_benchmarks(benchmarks, key="--benchmark")
    workdirs = run_dirs(dirs)
    if not workdirs:
        raise PathError(f"no runs with metrics.jsonl under {', '.join(map(str, dirs))}")
    first = Path(dirs[0])
    out = Path(out_dir) if out_dir else (first if not (first / "metrics.jsonl").is_file() else first.parent)
    settings = _what_differs(workdirs)
    names = [w.name for w in workdirs]
    runs_rows = [read_metrics(w) for w in workdirs]  # each metrics.jsonl read once
    rows = []
    for workdir, name, setting, metrics in zip(workdirs, names, settings, runs_rows):
        row = {"run": name, **setting, **_summary(workdir, metrics)}
        if eval_data or eval_pairs:
            row.update(_generation_metrics(workdir, eval_data, eval_pairs, max_new_tokens, limit))
        if benchmarks:
            row.update(_benchmark_metrics(workdir, entries, limit))
        rows.append(row)
    setting_keys = list(dict.fromkeys(k for s in settings for k in s))
    scored = tuple(f"{e.name}/" for e in entries) if benchmarks else ()  # --benchmark's columns: with jaxft eval's
    metric_keys = sorted(dict.fromkeys(k for r in rows for k in r if k not in setting_keys and k != "run"),
                         key=lambda k: 30 if scored and k.startswith(scored) else _column_group(k))
    columns = ["run", *setting_keys, *metric_keys]
    if metric is None:
        metric = "eval_loss" if any(r.get("eval_loss") is not None for r in rows) else "loss"
    comparison = Comparison(rows, columns, metric)
    out.mkdir(parents=True, exist_ok=True)
    comparison.csv_path = out / "compare.csv"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(comparison.csv_path, table.getvalue())
    comparison.png_path = plot_runs(runs_rows, names, metric, out / "compare.png")
    return comparison


_FIRST = ("steps", "loss", "eval_loss", "best_eval_loss", "best_eval_step")
_LAST = ("tokens_per_sec", "wall_s")


def _column_group(key: str) -> int:
    """Table order: training summary, other eval metrics, speed, then `jaxft eval`'s metrics
    (sorted is stable: within a group, the order runs first report them)."""
    if key in _FIRST:
        return _FIRST.index(key)
    if key in _LAST:
        return 20 + _LAST.index(key)
    return 30 if key in _GENERATION_KEYS or key == "gen_eval_loss" else 10


def _export_of(workdir: Path) -> Path:
    export = workdir / "hf"
    if not (export / "config.json").is_file():
        raise PathError(f"{export} not found: scoring each run needs its export (jaxft export {workdir} --out {export})")
    return export


def _benchmark_metrics(workdir: Path, entries, limit) -> dict:
    """Each benchmark scored greedily on the run's export: {"NAME/pass@1": ..., ...}."""
    from jaxft.eval.benchmarks.base import EvalSettings
    from jaxft.eval.folder import evaluate_benchmark

    export, out = _export_of(workdir), {}
    for entry in entries:
        result = evaluate_benchmark(str(export), entry.name, EvalSettings(data=entry.data, limit=limit))
        out.update({f"{result.benchmark}/{k}": float(v) for k, v in result.metrics.items()})
    return out


def _generation_metrics(workdir: Path, eval_data, eval_pairs, max_new_tokens, limit) -> dict:
    """`jaxft eval` on the run's export (WORKDIR/hf), prefixed "gen_" where the name would
    clash with the run's own eval_loss."""
    from jaxft.eval.folder import evaluate_folder

    export = workdir / "hf"
    if not (export / "config.json").is_file():
        raise PathError(f"{export} not found: comparing generations needs each run's export "
                                f"(jaxft export {workdir} --out {export})")
    got = evaluate_folder(str(export), eval_data, pairs_file=eval_pairs, max_new_tokens=max_new_tokens,
                          limit=limit)
    return {("gen_eval_loss" if k == "eval_loss" else k): v for k, v in got.items()
            if k in _GENERATION_KEYS and isinstance(v, (int, float))}
