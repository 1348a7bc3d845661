"""`jaxft sft`, `jaxft dpo`, `jaxft iterate` and `jaxft quickstart`: the commands that train."""

from __future__ import annotations

import argparse
import os
import sys

from jaxft.cli.common import _config_flags


def _train(kind, argv):
    prog = f"jaxft {kind}"
    if any(a in ("-h", "--help") for a in argv):
        import jaxft.config

        print(f"usage: {prog} --config configs/{kind}.py[:preset] --workdir DIR [--config.KEY=VALUE ...]\n\n"
              + (jaxft.config.__doc__ or ""))
        raise SystemExit(0)
    fv = _config_flags(argv, prog, workdir=True)
    from jaxft.loop import EXIT_INTERRUPTED, Preempted
    from jaxft.parallel.distributed import initialize
    from jaxft.run import run

    initialize()  # before anything touches the devices
    try:
        result = run(fv.config, fv.workdir, kind=kind)
    except Preempted as err:  # SIGTERM (exit 75) or a first Ctrl-C (130): saved
        print(err, file=sys.stderr)
        raise SystemExit(err.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began: nothing saved
        print("interrupted (Ctrl-C): stopped without saving; rerun the same command to resume from "
              "the last checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # at once: an unfinished async save is not waited for (never committed)
    exports = [f"Hugging Face export in {result.export_dir}"] if result.export_dir else []
    exports += [f"PEFT adapter in {result.adapter_dir}"] if result.adapter_dir else []
    print(f"done: step {result.step}; metrics in {result.workdir}/metrics.jsonl"
          + "".join(f"; {e}" for e in exports))


def _quickstart(argv):
    p = argparse.ArgumentParser(prog="jaxft quickstart", description=(
        "SFT then DPO of the bundled tiny model on the bundled data, on CPU in a few minutes"))
    p.add_argument("--workdir", default="jaxft_quickstart", help="where data, runs and results go")
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--questions", type=int, default=200, help="held-out questions to evaluate")
    a = p.parse_args(argv)
    from jaxft.quickstart.pipeline import run_quickstart

    run_quickstart(a.workdir, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps, num_questions=a.questions)


def _iterate(argv):
    if any(a in ("-h", "--help") for a in argv):
        from jaxft.iterate import rounds

        print("usage: jaxft iterate --config configs/iterate.py[:preset] --workdir DIR [--config.KEY=VALUE ...]\n\n"
              + (rounds.__doc__ or ""))
        raise SystemExit(0)
    fv = _config_flags(argv, "jaxft iterate", workdir=True)
    from jaxft.iterate.rounds import iterate
    from jaxft.loop import EXIT_INTERRUPTED
    from jaxft.parallel.distributed import initialize

    initialize()
    try:
        iterate(fv.config, fv.workdir)  # a SIGTERM / first Ctrl-C: a Preempted, exit 75 / 130 (jaxft.cli.main)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped where it was
        print("interrupted (Ctrl-C): stopped at once; rerun the same command to resume from the files and "
              "checkpoints written", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)
