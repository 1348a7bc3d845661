"""`jaxft sweep`, `jaxft compare` and `jaxft plot`: runs over swept keys, and the curves and tables
of finished runs."""

from __future__ import annotations

import argparse

from jaxft.cli.common import _split_config_args, check_config_file


def _sweep(argv):
    p = argparse.ArgumentParser(
        prog="jaxft sweep",
        description="runs of one config over swept keys, each in WORKDIR/NAME, one after another; finished "
                    "runs are skipped and unfinished ones resume. Either --config FILE[:preset] with --sweep "
                    "flags, or a sweep file (configs/ablations/NAME.py: get_config() and get_sweep()). "
                    "--config.KEY=VALUE flags apply to every run (a run's own settings win).")
    p.add_argument("sweep_file", nargs="?", default=None, help="configs/ablations/NAME.py[:arg]")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its values (values holding commas: separate them with |)")
    p.add_argument("--zip", action="store_true", help="pair the i-th values of every --sweep instead of crossing them")
    p.add_argument("--kind", choices=("sft", "dpo"), default=None, help="default: from the config file's name")
    p.add_argument("--workdir", required=True, help="the sweep folder: one sub-folder per run")
    p.add_argument("--only", action="append", default=None, metavar="NAME", help="run just this run (repeatable)")
    p.add_argument("--print-commands", action="store_true", help="print one jaxft command per run; run nothing")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison table at the end")
    config_args, rest = _split_config_args(argv)
    a = p.parse_args(rest)
    from jaxft import sweep
    from jaxft.config import merge_overrides

    spec = next((config_args[i + 1] for i, x in enumerate(config_args) if x == "--config"), None)
    spec = spec or next((x.split("=", 1)[1] for x in config_args if x.startswith("--config=")), None)
    common = dict(x[len("--config."):].split("=", 1) for x in config_args if x.startswith("--config."))
    if (a.sweep_file is None) == (spec is None):
        raise SystemExit("jaxft sweep: give either a sweep file or --config FILE[:preset] with --sweep flags")
    if a.sweep_file:
        if a.sweep:
            raise SystemExit("jaxft sweep: --sweep flags go with --config; a sweep file's get_sweep() lists its runs")
        try:
            listed = sweep.load_sweep_file(a.sweep_file)
        except ValueError as err:  # the file's failure at import or in get_sweep, with its line
            raise SystemExit(f"jaxft sweep: {err}") from None
        runs = [sweep.Run(r.name, r.kind, r.config, merge_overrides(common, r.overrides)) for r in listed]
    else:
        if not a.sweep:
            raise SystemExit("jaxft sweep: --config needs at least one --sweep KEY=V1,V2")
        check_config_file(spec, "jaxft sweep")  # before --kind is read from it
        axes = dict(sweep.parse_axis(flag) for flag in a.sweep)
        runs = sweep.grid(axes, kind=a.kind or sweep.spec.infer_kind(spec), config=spec, paired=a.zip,
                          overrides=common)
    for config in dict.fromkeys(r.config for r in runs if r.config and r.config != spec):
        # every config file a run names fails here as `jaxft sft` would fail on it, naming its line
        check_config_file(config, "jaxft sweep", flag="sweep file" if config == a.sweep_file else "config")
    if a.print_commands:
        print("\n".join(sweep.commands(runs, a.workdir)))
        return
    from jaxft.parallel.distributed import initialize

    initialize()
    result = sweep.run_sweep(runs, a.workdir, only=a.only)
    if not a.no_compare and (result.finished or result.skipped):
        table = sweep.compare([a.workdir])
        print(table.markdown())
        print(f"table: {table.csv_path}\ncurves ({table.metric}): {table.png_path}")
    if result.failed:
        # Each run's error (with its traceback where it was not a user error) is in the log above.
        raise SystemExit("jaxft sweep: error: sweep runs failed: "
                         + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))


def _compare(argv):
    p = argparse.ArgumentParser(prog="jaxft compare",
                                description="runs side by side: a Markdown table, OUT/compare.csv and OUT/compare.png")
    p.add_argument("dirs", nargs="+", help="run workdirs and / or sweep folders")
    p.add_argument("--metric", default=None, help="the curve to overlay (default eval_loss, else loss)")
    p.add_argument("--out", default=None, help="where compare.csv / compare.png go (default: the sweep folder)")
    p.add_argument("--data", default=None, help="questions with answers: exact match and repetition of each export")
    p.add_argument("--pairs", default=None, help="preference pairs: preference accuracy of each export")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--benchmark", default=None, metavar="NAME[=DATA],...",
                   help="score each export on benchmarks (greedy pass@1 and their own numbers; as "
                        "train.eval_benchmarks takes them: gsm8k=data/gsm8k_test.jsonl,math); benchmarks scored "
                        "during training are columns without it (eval/NAME/pass@1)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions / problems")
    a = p.parse_args(argv)
    from jaxft.io.folders import check_output
    from jaxft.sweep import compare

    if a.out:
        check_output(a.out, "--out", folder=True)
    table = compare(a.dirs, metric=a.metric, out_dir=a.out, eval_data=a.data, eval_pairs=a.pairs,
                    max_new_tokens=a.max_new_tokens, limit=a.limit, benchmarks=a.benchmark)
    print(table.markdown())
    print(f"table: {table.csv_path}\ncurves ({table.metric}): {table.png_path}")


def _plot(argv):
    p = argparse.ArgumentParser(prog="jaxft plot", description="PNG of loss and learning rate")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="default: WORKDIR/metrics.png")
    a = p.parse_args(argv)
    from jaxft.io.folders import check_output
    from jaxft.io.metrics import plot

    if a.out:
        check_output(a.out, "--out", folder=False)
    print(f"wrote {plot(a.workdir, a.out)}")
