"""`jaxft <command>`: parses flags and config files, then calls library functions. No logic.

Every command here is one Python call away in a notebook (see README.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

USAGE = """usage: jaxft <command> [options]

commands:
  quickstart   generate the bundled data, SFT then DPO the tiny model, evaluate all three
  sft          supervised fine-tuning:  jaxft sft --config configs/sft.py[:preset] --workdir DIR
  dpo          preference optimisation: jaxft dpo --config configs/dpo.py[:preset] --workdir DIR
  export       checkpoint -> Hugging Face folder: jaxft export WORKDIR [--step N] [--dtype bfloat16] [--merge | --adapter] --out DIR
  generate     sample from a Hugging Face folder: jaxft generate --model DIR --prompt TEXT [--prompts FILE]
  eval         exact match, repetition, eval loss, preference accuracy: jaxft eval --model DIR --data FILE
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


def _config_flags(argv, prog, *, workdir: bool):
    """--config FILE[:arg] --config.KEY=VALUE ... (and --workdir DIR) via ml_collections
    config_flags: the same locked config `jaxft.config.load` builds."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    argv = [prog] + list(argv)
    # sys_argv: which --config.KEY overrides exist is read from these arguments, not from
    # sys.argv (which differs when `cli.main([...])` is called from Python).
    config_flags.DEFINE_config_file("config", None, "config file: configs/NAME.py[:preset]",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    if workdir:
        flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, export; reused = resume",
                            flag_values=fv)
    spec = _config_spec(argv)
    if spec and not os.path.isfile(spec.split(":", 1)[0]):
        # ml_collections would defer this to the first use of the config, as a traceback.
        raise SystemExit(f"{prog}: --config {spec}: config file {spec.split(':', 1)[0]} not found")
    try:
        fv(argv)
    except flags.Error as err:
        raise SystemExit(f"{prog}: {_flag_error(err)}")
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a bad --config.KEY=VALUE
        raise SystemExit(f"{prog}: {_override_error(err, argv)}")
    except Exception as err:  # the config file itself fails (SyntaxError, NameError, ...)
        from jaxft.config import config_file_error

        raise SystemExit(f"{prog}: --config {spec}: {config_file_error(err, (spec or '').split(':', 1)[0])}")
    if fv.config is None or (workdir and fv.workdir is None):
        raise SystemExit(f"{prog}: --config{' and --workdir are' if workdir else ' is'} required")
    return fv


def _config_spec(argv) -> str | None:
    """The FILE[:arg] of --config in `argv` (None without one)."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _flag_error(err: BaseException) -> str:
    """absl's flag error in one line. An exception raised by the config file's get_config (an
    unknown preset) arrives as "Error whilst parsing config file:" and its whole traceback: keep
    the flag and the exception's last line."""
    message = str(err)
    if "Error whilst parsing config file" in message:
        flag = message.split(": Error whilst parsing", 1)[0]
        last = next(line for line in reversed(message.splitlines()) if line.strip())
        return f"{flag}: {last.strip()}"
    return " ".join(message.split())


def _override_error(err: BaseException, argv) -> str:
    """ml_collections' error for a bad override (a KeyError inside an AttributeError, with its
    "Did you mean" suggestion) as one line naming the flag."""
    while isinstance(err, (AttributeError, KeyError)) and err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    message = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    key = message.split("'")[1] if message.count("'") >= 2 else None
    flag = next((a for a in argv if key and a.startswith("--config.") and f".{key}" in a.split("=")[0]), None)
    return f"{flag or 'config override'}: {message}"


def _split_config_args(argv):
    """(the --config / --config.KEY=VALUE arguments, the rest)."""
    config_args, rest, args = [], [], iter(argv)
    for a in args:
        if a == "--config":
            config_args += [a, next(args, "")]
        elif a.startswith(("--config=", "--config.")):
            config_args.append(a)
        else:
            rest.append(a)
    return config_args, rest


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


def _export(argv):
    p = argparse.ArgumentParser(prog="jaxft export", description="write a checkpoint as a Hugging Face folder")
    p.add_argument("workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: latest")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the training param dtype)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge", dest="kind", action="store_const", const="merge",
                      help="LoRA run: a full HF folder, adapters merged into the base (the default)")
    kind.add_argument("--adapter", dest="kind", action="store_const", const="adapter",
                      help="LoRA run: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    a = p.parse_args(argv)
    from jaxft.io.export import export_checkpoint
    from jaxft.models.config import parse_dtype

    out = export_checkpoint(a.workdir, a.out, step=a.step, dtype=parse_dtype(a.dtype, key="--dtype"), kind=a.kind)
    print(f"exported to {out}")


def _plot(argv):
    p = argparse.ArgumentParser(prog="jaxft plot", description="PNG of loss and learning rate")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="default: WORKDIR/metrics.png")
    a = p.parse_args(argv)
    from jaxft.io.metrics import plot

    print(f"wrote {plot(a.workdir, a.out)}")


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


def _generate(argv):
    p = argparse.ArgumentParser(prog="jaxft generate", description="sample from a Hugging Face model folder")
    p.add_argument("--model", required=True, help="Hugging Face folder (WORKDIR/hf; a run's WORKDIR means it)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL records with a 'prompt' or 'messages' (an eval data file works)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--raw", action="store_true", help="no chat template, even if the tokenizer has one")
    a = p.parse_args(argv)
    from jaxft.eval.generation import read_prompts
    from jaxft.inference.generate import generate_cli

    empty = [i for i, text in enumerate(a.prompt, 1) if not text.strip()]
    if empty:
        p.error(f"--prompt number {empty[0]} is empty: give the text to continue")
    prompts = a.prompt + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        p.error("give --prompt TEXT (repeatable) and / or --prompts FILE")
    outputs = generate_cli(a.model, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, chat=False if a.raw else None)
    for prompt, out in zip(prompts, outputs):
        print(f">>> {prompt if isinstance(prompt, str) else prompt[-1].get('content')}\n{out}\n")


def _eval(argv):
    p = argparse.ArgumentParser(prog="jaxft eval", description=(
        "evaluate a Hugging Face folder: greedy answers (exact match, repetition ratio) and eval "
        "loss on --data, preference accuracy on --pairs"))
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="JSONL records with an 'answer' field")
    p.add_argument("--pairs", default=None, help="preference pairs (prompt/chosen/rejected)")
    p.add_argument("--reference", default=None, help="reference model for implicit-reward accuracy")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512)
    a = p.parse_args(argv)
    import json

    from jaxft.eval.folder import evaluate_folder

    result = evaluate_folder(a.model, a.data, pairs_file=a.pairs, reference_dir=a.reference,
                             max_new_tokens=a.max_new_tokens, limit=a.limit, max_length=a.max_length)
    print(json.dumps(result, indent=2))


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _check_data(argv):
    config_args, argv = _split_config_args(argv)
    p = argparse.ArgumentParser(prog="jaxft check-data", description=(
        "validate and measure a dataset as `jaxft sft` / `jaxft dpo` would read it; exits 1 on errors. "
        "With --config configs/NAME.py[:preset] [--config.KEY=VALUE ...], checks what that run "
        "would see: its data.train and data.eval, tokenizer, template, format, max_length, "
        "truncation, packing and batch size (the flags below override them)"))
    p.add_argument("source", nargs="*", default=[], metavar="SOURCE_SPEC",
                   help="what data.train takes: a file, glob, folder, save_to_disk folder, hub name or a "
                        "weighted mixture 'a.jsonl=2,b.jsonl=1'; several are checked one by one "
                        "(default with --config: data.train and data.eval)")
    p.add_argument("--kind", choices=("sft", "dpo", "auto"), default=None,
                   help="default: sft, or auto (from the records) with --config")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the config's, else the bundled one)")
    p.add_argument("--max-length", type=int, default=None, help="default 512")
    p.add_argument("--format", default=None, help="default auto")
    p.add_argument("--truncation", default=None, choices=("truncate_completion", "drop"))
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument("--max-record-bytes", type=int, default=None,
                   help="records over this are dropped unread (default 1048576; 0 = no limit)")
    p.add_argument("--chat-template", default="", help="Jinja template file for tokenizers without one")
    p.add_argument("--workdir", default=None,
                   help="a run's workdir: read (or build) its tokenised cache, WORKDIR/data_cache, unless "
                        "data.cache_dir names another folder")
    a = p.parse_args(argv)
    from jaxft.config import apply_overrides, base_config
    from jaxft.data.check import check_spec, format_check_result, format_mixture
    from jaxft.data.from_config import load_kwargs, load_tokenizer

    if config_args:
        config = _config_flags(config_args, "jaxft check-data", workdir=False).config
        kind = a.kind or "auto"
    elif not a.source:
        raise SystemExit("jaxft check-data: give a data source, or --config configs/NAME.py[:preset]")
    else:
        config = base_config()
        config.data.max_length, config.train.batch_size = 512, 32
        kind = a.kind or "sft"
    flags = {"model.tokenizer": a.tokenizer, "data.max_length": a.max_length, "data.format": a.format,
             "data.truncation": a.truncation, "train.batch_size": a.batch_size,
             "data.max_record_bytes": a.max_record_bytes}
    apply_overrides(config, {k: v for k, v in flags.items() if v is not None})
    if a.chat_template:
        config.data.chat_template = open(a.chat_template).read()
    specs = [(spec, "data.train") for spec in a.source] or (
        [(config.data.train, "data.train")] + ([(config.data.eval, "data.eval")] if config.data.eval else []))
    tokenizer = load_tokenizer(config)
    options = {k: v for k, v in load_kwargs(config, a.workdir).items() if k != "skip_invalid"}
    ok, train_kind = True, kind
    for spec, field in specs:
        # data.eval is read with data.train's kind; several SOURCE_SPECs are each their own.
        checked = check_spec(spec, tokenizer, kind=train_kind if field == "data.eval" else kind, field=field,
                             max_length=config.data.max_length, batch_size=config.train.batch_size,
                             packing=config.data.packing, **options)
        train_kind = checked.kind if field == "data.train" else train_kind
        for result in checked.results:
            print(format_check_result(result))
        if mixture := format_mixture(checked):
            print(mixture)
        ok &= checked.ok
    if not ok:
        raise SystemExit(1)


def _bench(argv):
    p = argparse.ArgumentParser(prog="jaxft bench", description=(
        "SFT and DPO step throughput on the same tokens, measured side by side in one process "
        "(interleaved rounds, best of each); --compare torch / tunix times transformers + PyTorch / Tunix too"))
    p.add_argument("--preset", default="tiny", help="model architecture (jaxft.models.PRESETS), e.g. bench")
    p.add_argument("--batch-size", type=int, default=8, help="rows (= 2 x DPO pairs)")
    p.add_argument("--lengths", "--length", default="256",
                   help="comma-separated sequence lengths, e.g. 256,1024,2048 (cost growth)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed round (default: 1-5 per step kind, about a second a round)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    p.add_argument("--chunk-size", type=int, default=128, help="sft_chunked_ce's loss chunk")
    p.add_argument("--compute-dtype", default=None, help="e.g. bfloat16 on accelerators")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smaller real models)")
    p.add_argument("--attention", default=None,
                   help="attention backend (model.attention: auto, reference, blockwise, xla, ...)")
    p.add_argument("--compare", action="append", default=[], choices=("torch", "tunix"),
                   help="also time the same steps in transformers + PyTorch (torch) or Tunix (tunix); repeatable")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also time LoRA steps of this rank (SFT, and DPO with the adapters-off reference)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args(argv)
    try:
        lengths = [int(n) for n in a.lengths.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"jaxft bench: --lengths {a.lengths!r} must be comma-separated integers") from None
    import json

    from jaxft.bench import format_bench, run_bench
    from jaxft.models.config import parse_dtype

    overrides = {"num_layers": a.layers} if a.layers else None
    report = run_bench(preset=a.preset, batch_size=a.batch_size, lengths=lengths, steps=a.steps, rounds=a.rounds,
                       chunk_size=a.chunk_size, overrides=overrides, attention=a.attention, compare=a.compare,
                       compute_dtype=parse_dtype(a.compute_dtype, key="--compute-dtype"), lora_rank=a.lora)
    print(format_bench(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


def _plan(argv):
    config_args, argv = _split_config_args(argv)
    p = argparse.ArgumentParser(prog="jaxft plan", description=(
        "per-device memory and time of one training step of --config configs/NAME.py[:preset] "
        "[--config.KEY=VALUE ...] on a TPU slice, compiled ahead of time on this machine through "
        "libtpu (nothing allocated, nothing run); GPU targets get an analytic estimate"))
    p.add_argument("--target", required=True, help="v4-32, v5p-8, v5p-64, v5e-16, v6e-256, 8xH100, ...")
    p.add_argument("--kind", choices=("sft", "dpo"), default="sft")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args(argv)
    if not config_args:
        raise SystemExit("jaxft plan: --config configs/NAME.py[:preset] is required")
    # Nothing executes: keep JAX off local accelerators (a TPU VM's chips may be training).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = _config_flags(config_args, "jaxft plan", workdir=False).config
    import json

    from jaxft.plan import format_plan, plan

    result = plan(config, target=a.target, kind=a.kind)
    print(format_plan(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)


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

    spec = next((config_args[i + 1] for i, x in enumerate(config_args) if x == "--config"), None)
    spec = spec or next((x.split("=", 1)[1] for x in config_args if x.startswith("--config=")), None)
    common = dict(x[len("--config."):].split("=", 1) for x in config_args if x.startswith("--config."))
    if (a.sweep_file is None) == (spec is None):
        raise SystemExit("jaxft sweep: give either a sweep file or --config FILE[:preset] with --sweep flags")
    if a.sweep_file:
        if a.sweep:
            raise SystemExit("jaxft sweep: --sweep flags go with --config; a sweep file's get_sweep() lists its runs")
        runs = [sweep.Run(r.name, r.kind, r.config, {**common, **r.overrides}) for r in sweep.load_sweep_file(a.sweep_file)]
    else:
        if not a.sweep:
            raise SystemExit("jaxft sweep: --config needs at least one --sweep KEY=V1,V2")
        axes = dict(sweep.parse_axis(flag) for flag in a.sweep)
        runs = sweep.grid(axes, kind=a.kind or sweep.spec.infer_kind(spec), config=spec, paired=a.zip,
                          overrides=common)
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
        raise RuntimeError("sweep runs failed: " + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))


def _compare(argv):
    p = argparse.ArgumentParser(prog="jaxft compare",
                                description="runs side by side: a Markdown table, OUT/compare.csv and OUT/compare.png")
    p.add_argument("dirs", nargs="+", help="run workdirs and / or sweep folders")
    p.add_argument("--metric", default=None, help="the curve to overlay (default eval_loss, else loss)")
    p.add_argument("--out", default=None, help="where compare.csv / compare.png go (default: the sweep folder)")
    p.add_argument("--data", default=None, help="questions with answers: exact match and repetition of each export")
    p.add_argument("--pairs", default=None, help="preference pairs: preference accuracy of each export")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    a = p.parse_args(argv)
    from jaxft.sweep import compare

    table = compare(a.dirs, metric=a.metric, out_dir=a.out, eval_data=a.data, eval_pairs=a.pairs,
                    max_new_tokens=a.max_new_tokens, limit=a.limit)
    print(table.markdown())
    print(f"table: {table.csv_path}\ncurves ({table.metric}): {table.png_path}")


COMMANDS = {
    "quickstart": _quickstart,
    "sft": lambda argv: _train("sft", argv),
    "dpo": lambda argv: _train("dpo", argv),
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
        raise SystemExit(error_line(f"jaxft {argv[0]}", err) + "\n(set JAXFT_TRACEBACK=1 for the traceback)")


# Errors that jaxft raises to name the file, record, flag or config key to fix (OSError: a path
# that is missing, unreadable or a folder, named by Python). Anything else is a bug.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


def error_line(prog: str, err: BaseException) -> str:
    """One line for `err`: its message (whitespace collapsed), or, for an exception jaxft did
    not mean to raise, its type and message marked as unexpected."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, EXPECTED_ERRORS):
        return f"{prog}: error: {message}"
    return f"{prog}: error: unexpected {type(err).__name__}: {message} (a jaxft bug: please report it)"


if __name__ == "__main__":
    main()
