"""What the commands share: --config flags (the config file run once, its --config.KEY=VALUE
overrides applied, locked), their errors in one line, and the one-line error of a failed command."""

from __future__ import annotations

import argparse
import os

from jaxft.errors import UserError


def _config_flags(argv, prog, *, workdir: bool):
    """--config FILE[:arg] --config.KEY=VALUE ... (and --workdir DIR): the config file run once
    (`jaxft.config.load_file`) and the overrides applied to it, rival keys included
    (`jaxft.config.clear_rivals`), locked: the config `jaxft.config.load(spec, overrides)`
    builds. Returns .config and .workdir; a mistake exits with one line naming the flag."""
    import types

    from jaxft.config import clear_rivals, set_key

    spec, overrides, workdir_value = _parse_config_args(list(argv), prog, workdir=workdir)
    if spec is None or (workdir and workdir_value is None):
        raise SystemExit(f"{prog}: --config{' and --workdir are' if workdir else ' is'} required")
    config = check_config_file(spec, prog)
    for key, (flag, value) in overrides.items():
        if value is None:  # a bare --config.KEY: true, for a boolean key
            value = "true" if _is_bool(config, key) else None
        if value is None:
            raise SystemExit(f"{prog}: {flag}: needs a value: {flag}=VALUE")
        try:
            set_key(config, key, value)
        except ValueError as err:
            raise SystemExit(f"{prog}: {flag}: {' '.join(str(err).split())}") from None
    # As `jaxft.config.load` does: --config.train.epochs=2 on a preset with train.steps trains 2 epochs.
    clear_rivals(config, overrides)
    config.lock()
    return types.SimpleNamespace(config=config, workdir=workdir_value)


def _parse_config_args(argv, prog, *, workdir: bool):
    """(the --config SPEC, {KEY: (flag, VALUE or None for a bare flag)}, the --workdir DIR) of
    `argv`; anything else exits naming it."""
    spec = folder = None
    overrides: dict[str, tuple[str, str | None]] = {}
    args = iter(enumerate(argv))
    for i, a in args:
        name, eq, value = a.partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else None
        takes_next = not eq and following is not None and not following.startswith("--")
        if name in ("--config", "--workdir") and not (workdir or name == "--config"):
            raise SystemExit(f"{prog}: unknown flag {a!r}")
        if name in ("--config", "--workdir"):
            if not eq and not takes_next:
                raise SystemExit(f"{prog}: {name} needs a value")
            value = value if eq else next(args)[1]
            spec, folder = (value, folder) if name == "--config" else (spec, value)
        elif name.startswith("--config."):
            if not eq and takes_next:
                value, eq = next(args)[1], "="
            overrides[name[len("--config."):]] = (f"{name}={value}" if eq else name, value if eq else None)
        else:
            raise SystemExit(f"{prog}: unknown {'flag' if a.startswith('-') else 'argument'} {a!r}: the flags are "
                             f"--config FILE[:preset], --config.KEY=VALUE{' and --workdir DIR' if workdir else ''}")
    return spec, overrides, folder


def _is_bool(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return isinstance(node, bool)


def check_config_file(spec: str, prog: str, *, flag: str = "--config"):
    """Runs config file `spec` ("FILE[:arg]") once (`jaxft.config.load_file`) and returns its
    ConfigDict (unlocked); its failure (missing, a SyntaxError, an ImportError or NameError at
    import, a get_config() that raises or is missing) exits with one line naming the file and
    the line: every command that takes a config file or a sweep file reports it this way,
    before anything is written."""
    import jaxft.config

    file = spec.split(":", 1)[0]
    if not os.path.isfile(file):
        raise SystemExit(f"{prog}: {flag} {spec}: config file {file} not found")
    try:
        return jaxft.config.load_file(spec)
    except (ValueError, OSError) as err:
        raise SystemExit(f"{prog}: {flag} {spec}: {_without_prefix(str(err), spec)}") from None


def _without_prefix(message: str, spec: str) -> str:
    """`jaxft.config.load`'s message without its "config file FILE: " (the line names FILE)."""
    prefix = f"config file {spec.partition(':')[0]}: "
    return message[len(prefix):] if message.startswith(prefix) else message


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


# The errors a user fixes (jaxft.errors: a config key or flag, a data file or record, a path), each
# naming what to change: one line. Anything else (a shape bug, an XLA or storage error, a ValueError
# jaxft did not mean to raise) keeps its traceback.
EXPECTED_ERRORS = (UserError,)
UNEXPECTED = ("not a problem with your config, data or paths: a jaxft bug or an outside failure (device, "
              "storage, memory); the traceback above shows where (please report a jaxft bug with it)")


def error_line(prog: str, err: BaseException) -> str:
    """One line for `err`: a user error's message (whitespace collapsed); any other exception's
    type and message, marked as unexpected (its traceback is printed above it)."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, EXPECTED_ERRORS):
        return f"{prog}: error: {message}"
    return f"{prog}: error: unexpected {type(err).__name__}: {message} ({UNEXPECTED})"
