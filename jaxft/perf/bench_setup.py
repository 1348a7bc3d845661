"""What `jaxft bench` runs: the model and settings a user's run gets by default, and a batch
laid out like user data. Every library the bench times (`jaxft.perf.bench`, and
`benchmarks/bench_torch.py`, `benchmarks/bench_tunix.py` of a source checkout) runs this config on this batch.

The settings are those of `configs/sft.py` and `configs/dpo.py` without a preset (the recipes
for your own model): param and compute dtype, remat, attention, and `train.loss_chunk_size`
resolved for the vocabulary by `jaxft.losses.resolve_chunk_size`, as a run resolves it.
"""

from __future__ import annotations

from pathlib import Path

from jaxft.errors import ConfigError, PathError
import numpy as np

from jaxft.losses import resolve_chunk_size
from jaxft.models import get_preset
from jaxft.models.attention import resolve
from jaxft.models.config import ModelConfig, dtype_name, parse_dtype

# The presetless recipes whose settings the bench runs (a source checkout's configs/).
CONFIGS = {method: Path(__file__).resolve().parents[2] / "configs" / f"{method}.py" for method in ("sft", "dpo")}
# The run config keys that set how the model computes: one model serves every kind, so the
# SFT and DPO recipes must agree on them.
MODEL_KEYS = ("dtype", "compute_dtype", "remat", "attention")


def _load_configs(configs: dict[str, str | Path], overrides: dict | None = None) -> dict:
    """{method: the locked ConfigDict of its recipe file, with `overrides`}."""
    from jaxft.config import load

    loaded = {}
    for method, path in configs.items():
        if not Path(path).is_file():
            raise PathError(f"jaxft bench runs the settings of {path}, which is not there: run it from "
                                    "a source checkout (pip install -e .)")
        loaded[method] = load(str(path), overrides)
    return loaded


def user_settings(configs: dict[str, str | Path] = CONFIGS) -> dict:
    """What a user's run gets by default: {"model": {KEY: value} for MODEL_KEYS (model.KEY of
    the SFT recipe, which the DPO recipe must match), "loss_chunk_size": {"sft": N, "dpo": N}
    (train.loss_chunk_size as set: -1 auto, 0 whole logits, > 0 tokens)}."""
    loaded = _load_configs(configs)
    sft, dpo = loaded["sft"], loaded["dpo"]
    differ = [k for k in MODEL_KEYS if sft.model[k] != dpo.model[k]]
    if differ:
        raise ConfigError(f"jaxft bench builds one model for SFT and DPO, but {configs['sft']} and {configs['dpo']} "
                         f"set {', '.join(f'model.{k}' for k in differ)} differently")
    return {"model": {k: sft.model[k] for k in MODEL_KEYS},
            "loss_chunk_size": {method: int(c.train.loss_chunk_size) for method, c in loaded.items()}}


def run_config(method: str, chunk_size: int | None = None):
    """The run config the bench builds `method`'s steps from (`jaxft.tasks`, as a run builds
    them): the presetless recipe, its train.loss_chunk_size replaced when `chunk_size` is given,
    one micro-batch a step and unpacked rows (the bench batch's layout)."""
    overrides = {"optim.accumulate": 1, "data.packing": False}
    if chunk_size is not None:
        overrides["train.loss_chunk_size"] = chunk_size
    return _load_configs({method: CONFIGS[method]}, overrides)[method]


def bench_config(preset: str, *, overrides: dict | None = None, compute_dtype=None, remat: str | None = None,
                 attention: str | None = None, chunk_size: int | None = None) -> tuple[ModelConfig, dict]:
    """(the ModelConfig the bench builds, its settings for the report): `preset` with
    `overrides` (e.g. {"num_layers": 2}) and `user_settings()`, each of compute_dtype, remat,
    attention and chunk_size (train.loss_chunk_size of both methods) replacing the configs'
    own when given. settings: {source, param_dtype, compute_dtype, remat, attention,
    attention_backend, loss_chunk_size (as set), loss_chunk (as the steps use it: tokens, 0 =
    whole logits), overridden (the keys given)}. Fails on a bad name before anything compiles."""
    if chunk_size is not None and chunk_size < -1:
        raise ConfigError(f"jaxft bench: --chunk-size {chunk_size}: use -1 (auto), 0 (whole logits) or tokens > 0")
    user = user_settings()
    model = user["model"]
    overrides = dict(overrides or {})
    cfg = get_preset(preset)
    if "num_layers" in overrides:  # the first layers, with their layer kinds
        cfg = cfg.with_layers(overrides.pop("num_layers"))
    cfg = cfg.replace(**overrides).replace(
        param_dtype=parse_dtype(model["dtype"], key="model.dtype"),
        compute_dtype=(compute_dtype if compute_dtype is not None
                       else parse_dtype(model["compute_dtype"], key="model.compute_dtype")),
        remat=remat if remat is not None else model["remat"],
        attention=attention if attention is not None else model["attention"])
    chunk_setting = {m: n if chunk_size is None else chunk_size for m, n in user["loss_chunk_size"].items()}
    given = {"compute_dtype": compute_dtype, "remat": remat, "attention": attention, "loss_chunk_size": chunk_size}
    settings = {
        "source": " / ".join(f"{Path(path).parent.name}/{Path(path).name}" for path in CONFIGS.values()),
        "param_dtype": dtype_name(cfg.param_dtype), "compute_dtype": dtype_name(cfg.compute_dtype),
        "remat": cfg.remat, "attention": cfg.attention, "attention_backend": resolve(cfg.attention),
        "loss_chunk_size": chunk_setting,
        "loss_chunk": {m: resolve_chunk_size(n, cfg.vocab_size) for m, n in chunk_setting.items()},
        "overridden": [k for k, v in given.items() if v is not None],
    }
    return cfg, settings


def bench_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Host arrays of one DPO-shaped batch, laid out as jaxft's data pipeline lays out user data;
    SFT uses its row keys. [B, L] int32 rows, [P] pairs (rows 2i / 2i+1 chosen / rejected).

    Row b holds round(L - b (L/2) / (B-1)) real tokens (L for the first, L/2 for the last, 3/4
    L on average) and is right-padded: token 0 (never drawn for a real token), position 0,
    segment 0, loss_mask 0. Its first L/4 tokens are the prompt (loss_mask 0; a pair's two rows
    share it)."""
    rng = np.random.default_rng(seed)
    real = np.linspace(length, length // 2, rows).round().astype(np.int32)  # [B]
    columns = np.arange(length, dtype=np.int32)
    in_row = columns[None, :] < real[:, None]  # [B, L]
    tokens = np.where(in_row, rng.integers(3, vocab, (rows, length)), 0).astype(np.int32)
    tokens[1::2, : length // 4] = tokens[0::2, : length // 4]  # a pair's rows share the prompt
    pairs = rows // 2
    return {
        "tokens": tokens,
        "positions": np.where(in_row, columns[None, :], 0).astype(np.int32),
        "segment_ids": in_row.astype(np.int32),
        "loss_mask": (in_row & (columns[None, :] >= length // 4)).astype(np.int32),
        "chosen_row": np.arange(0, rows, 2, dtype=np.int32),
        "rejected_row": np.arange(1, rows, 2, dtype=np.int32),
        "chosen_segment": np.ones(pairs, np.int32),
        "rejected_segment": np.ones(pairs, np.int32),
        "pair_mask": np.ones(pairs, np.int32),
        "pair_index": np.arange(pairs, dtype=np.int32),
    }


def batch_counts(batch: dict) -> dict:
    """{"positions", "real_tokens", "trained_tokens"} of a bench batch: [B, L], the positions
    that are not padding, those in the loss."""
    return {"positions": int(batch["tokens"].size), "real_tokens": int((batch["segment_ids"] > 0).sum()),
            "trained_tokens": int(batch["loss_mask"].sum())}
