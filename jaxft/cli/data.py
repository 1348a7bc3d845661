"""`jaxft check-data`: a dataset validated and measured as a run would read it."""

from __future__ import annotations

import argparse

from jaxft.cli.common import _config_flags, _split_config_args


def _check_data(argv):
    config_args, argv = _split_config_args(argv)
    a = _parser().parse_args(argv)
    config, kind = _config(a, config_args)
    specs = [(spec, "data.train") for spec in a.source] or (
        [(config.data.train, "data.train")] + ([(config.data.eval, "data.eval")] if config.data.eval else []))
    if not _check_specs(specs, config, kind, a.workdir):
        raise SystemExit(1)


def _parser() -> argparse.ArgumentParser:
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
    return p


def _config(a: argparse.Namespace, config_args: list[str]):
    """(typed Config, kind): the --config run's (or the defaults), with the flags applied."""
    from jaxft.config import apply_overrides, base_config, typed

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
        config.data.chat_template = _read_template(a.chat_template)
    return typed(config), kind  # every key known, of its type; read only from here


def _check_specs(specs: list[tuple[str, str]], config, kind: str, workdir: str | None) -> bool:
    """Checks and prints each (spec, config key); whether all were clean."""
    from jaxft.data.check import check_spec, format_check_result, format_mixture
    from jaxft.data.from_config import load_kwargs, load_tokenizer

    tokenizer = load_tokenizer(config)
    options = {k: v for k, v in load_kwargs(config, workdir).items() if k != "skip_invalid"}
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
    return ok


def _read_template(path: str) -> str:
    """The text of a --chat-template file (UTF-8, a byte-order mark dropped); errors name it."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SystemExit(f"jaxft check-data: --chat-template {path}: file not found") from None
    except IsADirectoryError:
        raise SystemExit(f"jaxft check-data: --chat-template {path} is a folder; give the Jinja template file") from None
    except UnicodeDecodeError as err:
        raise SystemExit(f"jaxft check-data: --chat-template {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                         f"at offset {err.start}); save it as UTF-8") from None
