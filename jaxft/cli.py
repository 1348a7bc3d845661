"""`jaxft <command>`: parses flags and config files, then calls library functions. No logic.

Every command here is one Python call away in a notebook (see README.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

USAGE = """usage: jaxft <command> [options]

commands:
  quickstart   generate the bundled data, fine-tune the tiny model, evaluate it
  sft          supervised fine-tuning:  jaxft sft --config configs/sft.py[:preset] --workdir DIR
  dpo          preference optimisation: jaxft dpo --config configs/dpo.py[:preset] --workdir DIR
  export       checkpoint -> Hugging Face folder: jaxft export WORKDIR [--step N] --out DIR
  check-data   validate a dataset before training: jaxft check-data FILE [--kind sft|dpo]
  plot         loss / learning-rate curves of a run: jaxft plot WORKDIR

Run `jaxft <command> --help` for a command's options.
"""


def _parse_config(argv, prog):
    """--config FILE[:arg] --config.KEY=VALUE ... --workdir DIR via ml_collections config_flags."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file: configs/NAME.py[:preset]",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, export; reused = resume",
                        flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} --config configs/{prog.split()[-1]}.py[:preset] --workdir DIR "
              "[--config.KEY=VALUE ...]\n\n" + (sys.modules["jaxft.config"].__doc__ or ""))
        raise SystemExit(0)
    try:
        fv([prog] + list(argv))
    except flags.Error as err:
        raise SystemExit(f"{prog}: {err}")
    if fv.config is None or fv.workdir is None:
        raise SystemExit(f"{prog}: --config and --workdir are required")
    return fv.config, fv.workdir


def _train(kind, argv):
    import jaxft.config  # noqa: F401  (for --help)
    from jaxft.train import EXIT_PREEMPTED, Preempted, run

    config, workdir = _parse_config(argv, f"jaxft {kind}")
    try:
        result = run(config, workdir, kind=kind)
    except Preempted as err:
        print(err, file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED)
    print(f"done: step {result.step}; metrics in {result.workdir}/metrics.jsonl; "
          f"Hugging Face export in {result.export_dir}")


def _export(argv):
    p = argparse.ArgumentParser(prog="jaxft export", description="write a checkpoint as a Hugging Face folder")
    p.add_argument("workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: latest")
    a = p.parse_args(argv)
    from jaxft.export import export_checkpoint

    print(f"exported to {export_checkpoint(a.workdir, a.out, step=a.step)}")


def _plot(argv):
    p = argparse.ArgumentParser(prog="jaxft plot", description="PNG of loss and learning rate")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="default: WORKDIR/metrics.png")
    a = p.parse_args(argv)
    from jaxft.metrics import plot

    print(f"wrote {plot(a.workdir, a.out)}")


COMMANDS = {
    "sft": lambda argv: _train("sft", argv),
    "export": _export,
    "plot": _plot,
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        raise SystemExit(f"jaxft: unknown command {argv[0]!r}\n\n{USAGE}")
    command(argv[1:])


if __name__ == "__main__":
    main()
