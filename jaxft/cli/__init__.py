"""`jaxft <command>`: parses flags and config files, then calls library functions. No logic.

Every command here is one Python call away in a notebook (see docs/python-api.md). A module per group of
commands: train (sft, dpo, iterate, quickstart), data (check-data), model (export, generate, eval), perf
(bench, plan), runs (sweep, compare, plot); common holds the flag and error helpers they share.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

# EXPECTED_ERRORS and _config_flags: reached as jaxft.cli.X (tests build a config as `jaxft sft` does).
from jaxft.cli.common import EXPECTED_ERRORS, _config_flags, error_line  # noqa: F401
from jaxft.cli.data import _check_data
from jaxft.cli.model import _eval, _export, _generate
from jaxft.cli.perf import _bench, _plan
from jaxft.cli.runs import _compare, _plot, _sweep
from jaxft.cli.train import _iterate, _quickstart, _train

USAGE = """usage: jaxft <command> [options]

commands:
  quickstart   generate the bundled data, SFT then DPO the tiny model, evaluate all three
  sft          supervised fine-tuning:  jaxft sft --config configs/sft.py[:preset] --workdir DIR
  dpo          preference optimisation: jaxft dpo --config configs/dpo.py[:preset] --workdir DIR
  iterate      rounds of sample, score, DPO on the model's own samples: jaxft iterate --config configs/iterate.py[:preset] --workdir DIR
  export       checkpoint -> Hugging Face folder: jaxft export WORKDIR [--step N] [--dtype bfloat16] [--merge | --adapter] --out DIR
  generate     sample from a Hugging Face folder: jaxft generate --model DIR --prompt TEXT [--prompts FILE]
  eval         benchmarks (pass@k): jaxft eval --model DIR --benchmark gsm8k|math|humaneval|mbpp|repetition|lm_eval:TASK
               [--data FILE|HUB_NAME --samples K --json OUT]; exact match, repetition, eval loss, preference
               accuracy: jaxft eval --model DIR --data FILE [--pairs FILE]
  check-data   validate data before training: jaxft check-data FILE --kind sft|dpo, or exactly what a
               run would see: jaxft check-data --config configs/sft.py[:preset] [--config.KEY=VALUE ...]
  plot         loss / learning-rate curves of a run: jaxft plot WORKDIR
  bench        SFT vs DPO step throughput side by side: jaxft bench [--preset bench --compare torch --json out.json]
  plan         memory and time of a step on a TPU slice: jaxft plan --config configs/sft.py[:preset] --target v5p-8
  sweep        ablations: jaxft sweep --config configs/dpo.py:tiny --sweep dpo.beta=0.05,0.5 --workdir DIR,
               or a sweep file: jaxft sweep configs/ablations/NAME.py --workdir DIR [--print-commands]
  compare      runs side by side (table, CSV, curves): jaxft compare DIR... [--metric eval_loss]

Run `jaxft <command> --help` for a command's options.
"""


COMMANDS = {
    "quickstart": _quickstart,
    "sft": lambda argv: _train("sft", argv),
    "dpo": lambda argv: _train("dpo", argv),
    "iterate": _iterate,
    "export": _export,
    "generate": _generate,
    "eval": _eval,
    "check-data": _check_data,
    "plot": _plot,
    "bench": _bench,
    "plan": _plan,
    "sweep": _sweep,
    "compare": _compare,
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
    try:
        command(argv[1:])
    except Exception as err:
        if os.environ.get("JAXFT_TRACEBACK"):
            raise
        if isinstance(getattr(err, "exit_code", None), int):  # Preempted out of a sweep or the quickstart
            print(err, file=sys.stderr)
            raise SystemExit(err.exit_code)
        if isinstance(err, EXPECTED_ERRORS):  # a config key, data file or path to fix: one line
            raise SystemExit(error_line(f"jaxft {argv[0]}", err) + "\n(set JAXFT_TRACEBACK=1 for the traceback)")
        traceback.print_exception(err, file=sys.stderr)  # a bug or an outside failure: where it happened
        raise SystemExit(error_line(f"jaxft {argv[0]}", err)) from err
