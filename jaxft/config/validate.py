"""Start-up validation: a config's values checked at the edge, before anything is written, each
failure a ConfigError naming the key, its allowed values and what it got."""

from __future__ import annotations

import math

from jaxft.config.schema import Config, typed
from jaxft.errors import ConfigError


def validate(config) -> Config:
    """Checks values that would otherwise fail deep inside training, or do something no one
    asks for (delete checkpoints, train backwards); names the key and its allowed values. Each
    numeric key's range and the meaning of 0 / -1 are the docs in `jaxft.config.schema`.
    (Method-specific keys, such as dpo.*, are checked by the method's Task.) Takes a ConfigDict,
    a dict or a Config; returns the typed Config (`jaxft.config.typed`), every key's type
    checked first."""
    config = typed(config)

    def get(key):
        section, name = key.split(".")
        return getattr(getattr(config, section), name)

    def need(ok, key, msg):
        if not ok:
            raise ConfigError(f"config key {key}: {msg}, got {get(key)!r}")

    def finite(key):
        value = get(key)
        need(math.isfinite(value), key, "must be a finite number")
        return value

    if not (config.model.path or config.model.preset):
        raise ConfigError("config key model.path: no model; set --config.model.path=HF_FOLDER (or model.preset, "
                          "e.g. configs/sft.py:tiny)")
    if not config.data.train:
        raise ConfigError("config key data.train: no training data; set --config.data.train=FILE")
    need(config.model.linear_chunk_size >= 0, "model.linear_chunk_size", "must be >= 0 (0 = the default)")
    _length_and_optimizer(config, need, finite)
    _data_and_train(config, need)
    _mesh(config, need)
    _lora(config, need, finite)
    return config


def _length_and_optimizer(config: Config, need, finite) -> None:
    train, optim = config.train, config.optim
    need(train.batch_size > 0, "train.batch_size", "must be >= 1")
    need(train.steps >= 0, "train.steps", "must be >= 0 (0 = not given: train.epochs sets the length)")
    need(finite("train.epochs") >= 0, "train.epochs", "must be >= 0 (0 = not given: train.steps sets the length)")
    if config.data.streaming:
        need(train.steps > 0, "train.steps", "must be > 0 with data.streaming=True (a stream has "
             "no known length, so train.epochs cannot set the run's length)")
    need(train.steps > 0 or train.epochs > 0, "train.steps", "must be > 0 (or set train.epochs)")
    need(optim.accumulate >= 1, "optim.accumulate", "must be >= 1")
    need(train.batch_size % optim.accumulate == 0, "optim.accumulate",
         f"must divide train.batch_size={train.batch_size}")
    need(finite("optim.lr") > 0, "optim.lr", "must be > 0")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0 (0 = not given: optim.warmup_ratio)")
    need(0.0 <= finite("optim.warmup_ratio") < 1.0, "optim.warmup_ratio", "must be in [0, 1)")
    need(0.0 <= finite("optim.min_lr_ratio") <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    need(finite("optim.weight_decay") >= 0, "optim.weight_decay", "must be >= 0")
    for key in ("train.router_aux_loss_coef", "train.router_z_loss_coef", "train.router_bias_update_rate"):
        need(finite(key) >= 0, key, "must be >= 0 (0 = off)")
    need(finite("optim.clip_norm") >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
    for key in ("optim.b1", "optim.b2"):
        need(0.0 <= finite(key) < 1.0, key, "must be in [0, 1)")
    need(finite("optim.eps") > 0, "optim.eps", "must be > 0")


def _data_and_train(config: Config, need) -> None:
    train, data = config.train, config.data
    need(data.max_length > 1, "data.max_length", "must be >= 2")
    need(data.max_segments_per_row >= 1, "data.max_segments_per_row", "must be >= 1")
    need(data.eval_batch_size >= 0, "data.eval_batch_size", "must be >= 0 (0 = train.batch_size)")
    need(data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    need(data.truncation in ("truncate_completion", "drop"), "data.truncation",
         "must be 'truncate_completion' or 'drop'")
    need(train.log_every > 0, "train.log_every", "must be >= 1")
    need(train.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
    need(train.max_to_keep >= 0, "train.max_to_keep", "must be >= 0 (0 = keep every checkpoint)")
    need(train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1 (1 = stop at the first non-finite step)")
    need(data.num_proc >= 0, "data.num_proc", "must be >= 0 (0 = every core)")
    need(data.max_record_bytes >= 0, "data.max_record_bytes", "must be >= 0 (0 = no limit)")
    need(train.eval_every >= -1, "train.eval_every", "must be >= 0 (0 = at the end), or -1 for every epoch")
    need(train.loss_chunk_size >= -1, "train.loss_chunk_size", "must be >= 0 (0 = whole), or -1 (auto)")
    need(train.prefetch >= 0, "train.prefetch", "must be >= 0 (0 = on demand)")
    need(train.preemption_check_every >= 1, "train.preemption_check_every", "must be >= 1")
    from jaxft.io.trackers import parse_report_to  # jax-free

    parse_report_to(train.report_to)  # unknown names and missing packages, named
    need(train.sample_every >= 0, "train.sample_every", "must be >= 0 (0 = no samples)")
    need(train.sample_prompts >= 1, "train.sample_prompts", "must be >= 1")
    need(train.sample_max_new_tokens >= 1, "train.sample_max_new_tokens", "must be >= 1")
    if train.sample_every:
        need(data.eval != "", "train.sample_every", "needs data.eval: the sample prompts are its first records")
    need(train.eval_benchmark_limit >= 0, "train.eval_benchmark_limit", "must be >= 0 (0 = every problem)")
    need(train.eval_benchmark_max_new_tokens >= 0, "train.eval_benchmark_max_new_tokens",
         "must be >= 0 (0 = the benchmark's default)")
    if train.eval_benchmarks:
        from jaxft.eval.train_benchmarks import parse_eval_benchmarks

        parse_eval_benchmarks(train.eval_benchmarks)  # unknown names, listing the known ones


def _mesh(config: Config, need) -> None:
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor,
             "sequence": config.mesh.sequence, "expert": config.mesh.expert}
    for axis, size in sizes.items():
        need(size == -1 or size >= 1, f"mesh.{axis}", "must be >= 1, or -1 for the devices left")
    need(list(sizes.values()).count(-1) <= 1, "mesh.data", f"only one mesh axis may be -1 (mesh {sizes})")


def _lora(config: Config, need, finite) -> None:
    lora = config.lora
    need(lora.rank >= 0, "lora.rank", "must be >= 0 (0 = full fine-tuning)")
    need(finite("lora.alpha") > 0, "lora.alpha", "must be > 0")
    need(0.0 <= finite("lora.dropout") < 1.0, "lora.dropout", "must be in [0, 1)")
    need(lora.rank > 0 or not lora.init_from, "lora.init_from", "needs lora.rank > 0 (set it to the adapter's r)")
    from jaxft.models.quantize import QUANTIZATIONS  # jax-free until a config uses lora.*

    need(lora.base_quantization in QUANTIZATIONS, "lora.base_quantization",
         f"must be one of {', '.join(QUANTIZATIONS)}")
    need(lora.rank > 0 or lora.base_quantization == "none", "lora.base_quantization",
         "quantizes a frozen base: needs lora.rank > 0 (full fine-tuning trains every weight)")
