"""The tokenizer and data a run config describes: what `jaxft sft|dpo` trains on and what
`jaxft check-data --config` checks, built by the same functions."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxft.data.assets import BUNDLED_TOKENIZER_DIR
from jaxft.errors import ConfigError, PathError


def load_bundled_tokenizer():
    """The committed 512-token tokenizer of the tiny preset (offline, via AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)


def load_tokenizer(config):
    """The tokenizer named by model.tokenizer, else model.path's, else the bundled one."""
    from transformers import AutoTokenizer

    source = config.model.tokenizer or config.model.path
    if not source:
        return load_bundled_tokenizer()
    from jaxft.io.folders import check_model_folder, missing_local_folder

    # A missing local folder, named, rather than transformers' "not a valid repo id".
    if not config.model.tokenizer:
        check_model_folder(source, flag="config key model.path:")
    elif missing_local_folder(source):
        raise PathError(f"config key model.tokenizer: {source}: the folder does not exist")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load a tokenizer from {source!r} (config key "
            f"{'model.tokenizer' if config.model.tokenizer else 'model.path'}): {err}"
        ) from err


def cache_dir(config, workdir=None) -> str | None:
    """Where tokenised caches go: data.cache_dir, or WORKDIR/data_cache when it is "" (None
    without a workdir, and for "none")."""
    value = config.data.cache_dir
    if value.lower() == "none" or (not value and workdir is None):
        return None
    return value or str(Path(workdir) / "data_cache")


def load_kwargs(config, workdir=None) -> dict:
    """The data.* options of `jaxft.data.tokenize.load_examples` (the cache under `workdir`)."""
    from jaxft.data.workers import default_num_proc

    return dict(fmt=config.data.format, truncation=config.data.truncation,
                skip_invalid=config.data.skip_invalid,
                completion_only_loss=config.data.completion_only_loss,
                chat_template=config.data.chat_template or None,
                num_proc=config.data.num_proc or default_num_proc(),
                max_record_bytes=config.data.max_record_bytes,
                cache_dir=cache_dir(config, workdir))


def train_data(config, tokenizer, *, kind: str, workdir=None):
    """This host's training `BatchIterator` for `data.train` (`.reports`: per-source counts);
    tokenised caches under `workdir` (see `cache_dir`). data.streaming: a `StreamBatchIterator`."""
    from jaxft.data.pipeline import make_train_iterator

    if config.data.streaming:
        from jaxft.data.stream import stream_from_config

        return stream_from_config(config, tokenizer, kind=kind, load_kwargs=load_kwargs(config, workdir))

    return make_train_iterator(
        config.data.train, tokenizer, kind=kind, global_batch_size=config.train.batch_size,
        max_length=config.data.max_length, packing=config.data.packing, seed=config.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        load_kwargs=load_kwargs(config, workdir), max_segments_per_row=config.data.max_segments_per_row)


def eval_data(config, tokenizer, *, kind: str, workdir=None):
    """This host's `EvalBatches` for `data.eval`, or None when it is not set."""
    from jaxft.data.pipeline import make_eval_batches

    if not config.data.eval:
        return None
    return make_eval_batches(
        config.data.eval, tokenizer, kind=kind, batch_size=eval_batch_size(config),
        max_length=config.data.max_length, packing=config.data.packing,
        process_index=jax.process_index(), process_count=jax.process_count(),
        load_kwargs=load_kwargs(config, workdir), max_segments_per_row=config.data.max_segments_per_row)


def eval_batch_size(config) -> int:
    return config.data.eval_batch_size or config.train.batch_size
