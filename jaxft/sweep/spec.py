"""What a sweep is: a list of runs, each a (name, kind, config spec, overrides).

A run's config is `jaxft.config.load(config, overrides)`, exactly as
`jaxft KIND --config CONFIG --config.KEY=VALUE ...` builds it, and its workdir is
`SWEEP_DIR/NAME`. An override value "@NAME/PATH" is a path inside run NAME's workdir
(`model.path="@sft/hf"`: start from run "sft"'s export), which makes that run depend on NAME.

`grid` builds runs from axes (the cross product, or paired with zip=True); a sweep file
(`configs/ablations/NAME.py`) is a config file (`get_config(arg)`) with a `get_sweep()` that
returns runs: its grids' runs without a config of their own use the file itself as config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxft.config import config_file_error, merge_overrides
from jaxft.errors import ConfigError, PathError

KINDS = ("sft", "dpo")
_REFERENCE = re.compile(r"^@([^/]+)(?:/(.*))?$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep. overrides: {dotted config key: value} (values as the command line
    takes them: strings, or Python values); config: "path/to/file.py[:arg]"."""
    name: str
    kind: str
    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def depends_on(self) -> list[str]:
        """The runs whose workdirs this run's overrides refer to ("@NAME/...")."""
        return [m[1] for v in self.overrides.values() if isinstance(v, str) and (m := _REFERENCE.match(v))]


def run(name: str, *, kind: str, config: str, overrides: Mapping[str, Any] | None = None) -> Run:
    """One named run (for sweep files that list their runs)."""
    return Run(name, kind, config, dict(overrides or {}))


def _text(value) -> str:
    return value if isinstance(value, str) else repr(value)


def run_name(swept: Mapping[str, Any], keys: Sequence[str]) -> str:
    """"beta=0.05,loss_type=ipo" for {dpo.beta: 0.05, dpo.loss_type: "ipo"}: each key's last
    part, or the whole key where two swept keys share it; characters a folder name should
    not hold become "_"."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    name = ",".join(f"{short[k]}={_text(swept[k])}" for k in keys)
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name) or "run"


def grid(axes: Mapping[str, Sequence[Any]], *, kind: str, config: str | None = None, paired: bool = False,
         overrides: Mapping[str, Any] | None = None, prefix: str = "") -> list[Run]:
    """The runs of `axes` ({key: [values]}): every combination (the first key varies slowest),
    or the i-th value of every key together (paired=True, `--zip`: equal lengths). `overrides`
    apply to every run first (a swept key drops its rival from them: `merge_overrides`); names
    come from the swept values (`run_name`), after `prefix`. config None: the sweep file's own
    config (set by `load_sweep_file`)."""
    keys = list(axes)
    values = [list(axes[k]) for k in keys]
    if not keys or any(not v for v in values):
        raise ConfigError(f"a sweep needs at least one key with at least one value; got {dict(axes)}")
    if paired and len({len(v) for v in values}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in zip(keys, values))
        raise ConfigError(f"--zip pairs the i-th values of every key, so each needs as many; got {lengths}")
    combos = zip(*values) if paired else itertools.product(*values)
    runs = []
    for combo in combos:
        swept = dict(zip(keys, combo))
        runs.append(Run(prefix + run_name(swept, keys), kind, config or "", merge_overrides(overrides or {}, swept)))
    return runs


def parse_axis(flag: str) -> tuple[str, list[str]]:
    """"dpo.beta=0.05,0.1" -> ("dpo.beta", ["0.05", "0.1"]). Values that hold commas themselves
    (dpo.loss_type=sigmoid,sft) are separated with "|" instead: "dpo.loss_type=sigmoid|sigmoid,sft"."""
    key, sep, values = flag.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"--sweep {flag!r}: expected KEY=VALUE1,VALUE2,... (e.g. dpo.beta=0.05,0.1)")
    return key.strip(), [v.strip() for v in values.split("|" if "|" in values else ",")]


def infer_kind(config_spec: str) -> str:
    """"sft" or "dpo" from the config file name (configs/dpo.py -> dpo), or from a module-level
    KIND in the file; else a ValueError asking for --kind."""
    path = Path(config_spec.partition(":")[0])
    if path.stem in KINDS:
        return path.stem
    kind = getattr(_module(path), "KIND", None) if path.is_file() else None
    if kind in KINDS:
        return kind
    raise ConfigError(f"cannot tell whether {config_spec} is an SFT or a DPO config: pass --kind sft|dpo "
                     f"(or set KIND = 'sft' in the file)")


def _module(path: Path, what: str = "config file"):
    """The module of config or sweep file `path`; its failure at import is a ValueError naming
    the file and line (`jaxft.config.config_file_error`, as `jaxft.config.load` gives it)."""
    spec = importlib.util.spec_from_file_location(f"jaxft_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a mistake in the file: where, not a traceback into it
        raise ConfigError(f"{what} {path}: {config_file_error(err, path)}") from err
    return module


def load_sweep_file(spec: str) -> list[Run]:
    """The runs of a sweep file "path.py[:arg]": its `get_sweep(arg)` (`get_sweep()` without an
    arg), each run without a config of its own taking the file (with the same arg) as its config."""
    file, _, arg = spec.partition(":")
    path = Path(file)
    if not path.is_file():
        raise PathError(f"sweep file {path} not found")
    module = _module(path, "sweep file")
    if not callable(getattr(module, "get_sweep", None)):
        raise ConfigError(f"sweep file {path} has no get_sweep(): a sweep file is a config file (get_config) "
                         f"whose get_sweep() returns its runs (jaxft.sweep.grid / jaxft.sweep.run)")
    try:
        runs = list(module.get_sweep(arg) if arg else module.get_sweep())
    except Exception as err:  # noqa: BLE001 - as a failure at import
        raise ConfigError(f"sweep file {path}: {config_file_error(err, path)}") from err
    bad = next((r for r in runs if not isinstance(r, Run)), None)
    if bad is not None:
        raise ConfigError(f"sweep file {path}: get_sweep() must return runs (jaxft.sweep.grid / "
                         f"jaxft.sweep.run), got {type(bad).__name__} {bad!r:.80}")
    return [dataclasses.replace(r, config=r.config or spec) for r in runs]


def check(runs: Sequence[Run]) -> list[Run]:
    """The runs in an order where every run comes after the runs it refers to; errors name the
    run: duplicate names, unknown kinds or references, cycles."""
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sweep runs must have distinct names; repeated: {', '.join(dupes)}")
    by_name = {r.name: r for r in runs}
    for r in runs:
        if r.kind not in KINDS:
            raise ConfigError(f"sweep run {r.name!r}: kind {r.kind!r} is not one of {', '.join(KINDS)}")
        if not r.config:
            raise ConfigError(f"sweep run {r.name!r} has no config (configs/NAME.py[:preset])")
        for d in r.depends_on():
            if d not in by_name:
                raise ConfigError(f"sweep run {r.name!r} refers to @{d}, which is not a run of this sweep; "
                                 f"runs: {', '.join(names)}")
    ordered, state = [], {}

    def visit(r: Run, path: tuple[str, ...]):
        if state.get(r.name) == "done":
            return
        if r.name in path:
            raise ConfigError(f"sweep runs refer to each other in a circle: {' -> '.join((*path, r.name))}")
        for d in r.depends_on():
            visit(by_name[d], (*path, r.name))
        state[r.name] = "done"
        ordered.append(r)

    for r in runs:
        visit(r, ())
    return ordered


def resolve_references(overrides: Mapping[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """Overrides with every "@NAME/PATH" replaced by SWEEP_DIR/NAME/PATH."""
    out = {}
    for key, value in overrides.items():
        m = _REFERENCE.match(value) if isinstance(value, str) else None
        out[key] = str(Path(sweep_dir) / m[1] / (m[2] or "")) if m else value
    return out
