"""What the commands share: --config flags (ml_collections, locked), their errors in one line, and
the one-line error of a failed command."""

from __future__ import annotations

import argparse
import os


def _config_flags(argv, prog, *, workdir: bool):
    """--config FILE[:arg] --config.KEY=VALUE ... (and --workdir DIR) via ml_collections
    config_flags: the same locked config `jaxft.config.load` builds (rival keys included:
    `jaxft.config.clear_rivals` on the keys the flags override)."""
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
    if spec:
        check_config_file(spec, prog)
    try:
        fv(argv)
    except flags.Error as err:
        raise SystemExit(f"{prog}: {_flag_error(err)}")
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a bad --config.KEY=VALUE
        raise SystemExit(f"{prog}: {_override_error(err, argv)}")
    if fv.config is None or (workdir and fv.workdir is None):
        raise SystemExit(f"{prog}: --config{' and --workdir are' if workdir else ' is'} required")
    from jaxft.config import clear_rivals

    # As `jaxft.config.load` does: --config.train.epochs=2 on a preset with train.steps trains 2 epochs.
    clear_rivals(fv.config, config_flags.get_override_values(fv["config"]))
    return fv


def check_config_file(spec: str, prog: str, *, flag: str = "--config") -> None:
    """Runs config file `spec` ("FILE[:arg]") as `jaxft.config.load` does; its failure (a
    SyntaxError, an ImportError or NameError at import, a get_config() that raises or is missing)
    exits with one line naming the file and the line: every command that takes a config file or
    a sweep file reports it this way, before anything is written."""
    import jaxft.config

    try:
        jaxft.config.load(spec)
    except (ValueError, OSError) as err:
        raise SystemExit(f"{prog}: {flag} {spec}: {_without_prefix(str(err), spec)}") from None


def _without_prefix(message: str, spec: str) -> str:
    """`jaxft.config.load`'s message without its "config file FILE: " (the line names FILE)."""
    prefix = f"config file {spec.partition(':')[0]}: "
    return message[len(prefix):] if message.startswith(prefix) else message


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


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


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
