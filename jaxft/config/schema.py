"""The config schema: one frozen dataclass per section, each key with its type, default and a
one-line doc. Everything else is derived from it: `base_config()` (the ConfigDict that config
files start from), `key_table()` (the manual's key table), the type checks at the edge
(`from_dict`) and the typed `Config` that library code reads as attributes.

To add a key: add a field here (`key(default, "doc")`), and, when a saved config of an older
run must keep its old behaviour, its old value to `jaxft.config.upgrade.OLD_VALUES`.
"""

import dataclasses
import difflib
from typing import Any, Mapping

from jaxft.errors import ConfigError


def key(default, doc: str):
    """A config key: its default and a one-line doc (the manual's key table)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The model to train: a Hugging Face folder or a built-in preset, its dtypes and kernels."""

    path: str = key("", "Hugging Face folder to start from; empty = `preset` with random weights")
    preset: str = key("", 'built-in architecture with random weights when `path` is empty ("tiny", ...)')
    dtype: str = key("float32", 'param dtype ("" = the checkpoint\'s)')
    compute_dtype: str = key("float32", "activation / matmul dtype")
    # jaxft.models.remat; saves memory for compute. True / False in older configs = full / none.
    remat: str = key("none", "what layers recompute in the backward pass: none | full | dots | dots_no_batch | "
                     "offload")
    scan_layers: bool = key(True, "stack and scan the layers: compile time independent of depth")
    # jaxft.models.attention
    attention: str = key("auto", "attention kernel: auto (splash on TPU, cuDNN on GPU, blockwise elsewhere) | "
                         "reference | blockwise | xla | cudnn | splash")
    tokenizer: str = key("", "tokenizer folder; empty = model.path, or the bundled one for presets")
    # jaxft.models.grouped_matmul
    moe_matmul: str = key("auto", "mixture-of-experts grouped matmuls: auto (gmm on TPU, ragged on GPU, blocks on "
                          "CPU) | ragged (jax.lax.ragged_dot) | gmm (the Pallas megablox kernel) | blocks")
    # jaxft.models.gated_deltanet: the chunk trades the [L, L] work a chunk against state reads
    linear_chunk_size: int = key(0, "Gated DeltaNet (Qwen3.5) layers: tokens per chunk of the chunked delta "
                                 "rule; 0 = the default (32, the fastest on CPU); >= 0")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """What to train and evaluate on, and how records become rows."""

    train: str = key("", 'file / glob / folder / hub name, or a mixture "a.jsonl=0.3,b.jsonl=0.7"')
    eval: str = key("", "held-out data (same forms as data.train); empty = no evaluation")
    format: str = key("auto", "record format; auto = detected from the records")
    max_length: int = key(512, "tokens per row (a packed DPO pair shares one); >= 2")
    truncation: str = key("truncate_completion", 'rows over max_length: "truncate_completion" or "drop"')
    packing: bool = key(False, "pack several examples into each row")
    max_segments_per_row: int = key(64, "with data.packing: segments per row at most (fixed shapes); >= 1, "
                                    ">= 2 for DPO (a pair is two)")
    skip_invalid: bool = key(False, "skip (and count) invalid records instead of stopping at the first")
    completion_only_loss: bool = key(True, "train on the completion's tokens only, not the prompt's")
    chat_template: str = key("", 'Jinja template for tokenizers without one ("" = the tokenizer\'s)')
    eval_batch_size: int = key(0, "0 = train.batch_size; else >= 1")
    # jaxft.data.cache: a shared path lets runs, sweeps and check-data reuse one tokenisation.
    cache_dir: str = key("", 'tokenised caches: "" = WORKDIR/data_cache; a shared path; "none" = tokenise '
                         "every time")
    num_proc: int = key(0, "tokenizer processes for the first tokenisation; 0 = every core; >= 0")
    # A tokenizer holds 100-250 bytes per character it encodes; 1 MiB is ~250k tokens.
    max_record_bytes: int = key(1 << 20, "records over this many bytes are dropped unread and counted; "
                                "0 = no limit; >= 0")
    streaming: bool = key(False, "read data.train as streams (jaxft.data.stream): bounded memory for sources "
                          "of any size; needs train.steps")
    shuffle_buffer: int = key(8192, "with data.streaming: examples per seeded shuffle window (and packing "
                              "chunk); >= 1")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The run: its length, batch, seed, and what it logs, evaluates, samples and saves."""

    # Set one of steps / epochs (configs/*.py do); see RIVALS for overrides of either.
    steps: int = key(0, "optimizer steps when > 0 (as TRL's max_steps, wins over train.epochs); "
                     "0 = not given; >= 0")
    epochs: float = key(0.0, "passes over the data (counted in batches) when train.steps is 0; "
                        "0 = not given; >= 0")
    batch_size: int = key(32, "global examples per step (pairs for DPO; rows when packing); >= 1")
    seed: int = key(0, "any integer")
    log_every: int = key(10, "steps between metrics rows (and the last step); >= 1")
    eval_every: int = key(0, "0 = only at the end (when data.eval is set); -1 = every epoch; else >= 1")
    save_every: int = key(500, "steps between checkpoints; 0 = only at the end (and on a preemption)")
    max_to_keep: int = key(3, 'newest checkpoints kept; 0 = keep every one (never "keep none")')
    keep_best: bool = key(False, "also keep the checkpoint with the lowest eval loss")
    max_bad_steps: int = key(5, "stop after this many non-finite steps in a row; >= 1 (1: at the first)")
    loss_chunk_size: int = key(-1, "> 0: cross-entropy over sequence chunks of this size; 0: whole; -1: "
                               "chunks of 512 for vocabularies of 32k tokens and more")
    router_aux_loss_coef: float = key(0.0, "mixture-of-experts models: transformers' load-balancing loss "
                                      "(aux_loss) times this joins the training loss (Mixtral's configs use "
                                      "0.02); 0 = off, as transformers' default; expert load is logged either "
                                      "way; >= 0")
    router_z_loss_coef: float = key(0.0, "mixture-of-experts models: ST-MoE's router z-loss (the mean of "
                                    "logsumexp(router logits) ** 2, which keeps router logits small; 0.001 in "
                                    "ST-MoE) times this joins the training loss; 0 = off; >= 0")
    router_bias_update_rate: float = key(0.0, "DeepSeek-V3 models: auxiliary-loss-free balancing, each MoE layer's "
                                         "expert-selection bias (e_score_correction_bias) moved by this after every "
                                         "update, down for experts busier than the mean, up for idler ones "
                                         "(DeepSeek-V3 pre-trained with 0.001); 0 = off (the checkpoint's biases "
                                         "kept); >= 0")
    progress: bool = key(True, "a progress bar on the terminal")
    prefetch: int = key(2, "batches made ahead in a background thread (0: on demand); >= 0")
    preemption_check_every: int = key(10, "multi-host: steps between SIGTERM checks (a gather); >= 1")
    # W&B needs `pip install 'jaxft[wandb]'`; WANDB_MODE=offline keeps its run in WORKDIR/wandb.
    report_to: str = key("tensorboard", "where metrics go besides WORKDIR/metrics.jsonl: tensorboard | wandb | "
                         'none, or a comma list ("tensorboard,wandb")')
    wandb_project: str = key("jaxft", "the W&B project (the run is named after the workdir)")
    # Samples are an eval example's tokens before its first trained one, completed greedily.
    sample_every: int = key(0, "every this many steps, greedy completions of data.eval's first prompts to "
                            "metrics.jsonl and the trackers; 0 = never")
    sample_prompts: int = key(4, "prompts sampled (data.eval's first); >= 1")
    sample_max_new_tokens: int = key(64, "tokens generated per sample; >= 1")
    # jaxft.eval.train_benchmarks: the runner of `jaxft eval --benchmark`, greedy, pass@1 (docs/evaluation.md).
    eval_benchmarks: str = key("", "benchmarks scored every train.eval_every steps and at the end, logged as "
                               'eval/NAME/pass@1: a comma list of NAME or NAME=DATA ("gsm8k=data/gsm8k_test.jsonl,'
                               'math"; lm_eval task lists join with +); empty = none')
    eval_benchmark_limit: int = key(0, "problems per benchmark (its first N); 0 = all; >= 0")
    eval_benchmark_max_new_tokens: int = key(0, "tokens generated per benchmark completion; 0 = the benchmark's "
                                             "default; >= 0")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with warmup and a decay schedule."""

    lr: float = key(2e-5, "the peak learning rate; > 0")
    schedule: str = key("cosine", "cosine | linear | constant (after the warmup)")
    warmup_steps: int = key(0, "> 0 wins over warmup_ratio; 0 = not given")
    warmup_ratio: float = key(0.0, "warmup as a share of the total steps (when warmup_steps is 0); [0, 1)")
    min_lr_ratio: float = key(0.0, "the schedule ends at lr * min_lr_ratio; [0, 1]")
    weight_decay: float = key(0.0, "AdamW's (not on biases and norms); >= 0")
    clip_norm: float = key(1.0, "global gradient norm clip; 0 = no clipping")
    accumulate: int = key(1, "micro-batches per optimizer step; >= 1, divides train.batch_size")
    b1: float = key(0.9, "Adam's first beta; [0, 1)")
    b2: float = key(0.999, "Adam's second beta; [0, 1)")
    eps: float = key(1e-8, "Adam's epsilon; > 0")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Devices per mesh axis; -1 (one axis at most) = the devices left; else >= 1."""

    data: int = key(-1, "data parallelism: devices per batch split")
    fsdp: int = key(1, "fully sharded data parallelism: params and optimizer state split over these devices")
    tensor: int = key(1, "tensor parallelism: each matmul split over these devices")
    sequence: int = key(1, "context parallelism: every row's tokens split over this many devices")
    expert: int = key(1, "expert parallelism: MoE experts split over these devices (divides the experts); "
                         "a batch axis for everything else")


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA (jaxft.models.lora): rank > 0 trains adapters on a frozen base; 0 = full fine-tuning."""

    rank: int = key(0, "adapter rank; 0 = full fine-tuning; >= 0")
    alpha: float = key(16.0, "the delta is scaled by alpha / rank (alpha / sqrt(rank) with rslora); > 0")
    targets: str = key("all-linear", 'or "q_proj,v_proj", or a regex over "self_attn.q_proj", "mlp.up_proj", ...')
    rslora: bool = key(False, "rank-stabilised scaling: alpha / sqrt(rank)")
    dropout: float = key(0.0, "on each adapter's input in training (PEFT's lora_dropout; TRL uses 0.05); [0, 1)")
    init_from: str = key("", "a PEFT adapter folder (adapter_config.json) to start from")
    base_quantization: str = key("none", 'QLoRA: store the frozen base as "int8" or "nf4", or an MoE\'s routed '
                                 'experts as "mxfp4" (jaxft.models.quantize)')


@dataclasses.dataclass(frozen=True)
class DpoSection:
    """DPO (jaxft.tasks.dpo): the loss and its reference model."""

    beta: float = key(0.1, "> 0")
    loss_type: str = key("sigmoid", 'the loss, or several: "sigmoid,sft" with dpo.loss_weights "1.0,0.5"')
    loss_weights: str = key("", "one weight per dpo.loss_type; empty = 1 each")
    label_smoothing: float = key(0.0, "[0, 1) (> 0 for exo_pair)")
    f_divergence_type: str = key("reverse_kl", "the f-divergence of f-DPO")
    reference: str = key("policy", '"policy" (initial weights) | HF folder | "none"')
    precompute_reference: bool = key(False, "compute the reference's log-probs once before training")
    # jaxft.tasks.online_dpo (docs/dpo.md, "Online DPO"), TRL's OnlineDPOTrainer.
    online: bool = key(False, "online DPO: data.train holds prompt records; each step samples two completions of "
                       "each prompt with the current weights, scores them with dpo.online_rewards and trains on "
                       "the pair (higher reward chosen; tied pairs are skipped and counted)")
    online_rewards: str = key("", 'with dpo.online: the rewards, as iterate.rewards ("KIND[:WEIGHT],..." or a JSON '
                              'list of {"kind", "weight", options}); needed')
    online_max_new_tokens: int = key(64, "with dpo.online: tokens sampled per completion at most; >= 1, and "
                                     "below data.max_length (the prompt takes the rest)")
    online_temperature: float = key(0.9, "with dpo.online: the sampling temperature; > 0 (TRL's default 0.9)")


@dataclasses.dataclass(frozen=True)
class IterateSection:
    """Iterative DPO and rejection sampling (`jaxft iterate`): rounds of sample, score, pair, train."""

    prompts: str = key("", "prompt records sampled each round: a 'prompt' or 'messages', plus the fields the "
                       "rewards read ('answer', ...); a file, folder, glob or hub name")
    eval_prompts: str = key("", "held-out prompt records: each round's greedy answers scored by the rewards; "
                            "empty = none")
    rounds: int = key(3, ">= 1")
    samples: int = key(4, "completions sampled per prompt (>= 2 for pairs)")
    prompts_per_round: int = key(0, "0 = every prompt each round; else the next N, cycling")
    temperature: float = key(1.0, "> 0")
    top_p: float = key(1.0, "(0, 1]")
    max_new_tokens: int = key(128, ">= 1")
    rewards: str = key("answer", '"KIND[:WEIGHT],..." (answer, regex, length, repetition, benchmark, python; '
                       'jaxft.rewards) or a JSON list of {"kind", "weight", options}')
    pairs: str = key("best_worst", '"best_worst": DPO on each prompt\'s best vs worst sample | "sft": '
                     "rejection-sampling SFT on the best")
    min_margin: float = key(0.0, "best_worst: the least reward margin of a pair; sft: the least reward kept")
    pairs_per_prompt: int = key(1, "best_worst: up to N disjoint pairs a prompt, the i-th best vs the i-th worst "
                                "while the margin passes (>= 1)")
    reference: str = key("round", '"round": each round\'s starting policy | "start": the first model')


@dataclasses.dataclass(frozen=True)
class Config:
    """A run's whole config, typed and read-only: `config.train.steps`. Built from a ConfigDict
    (`jaxft.config.typed`) or a dict (`from_dict`), which check every key's type."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    dpo: DpoSection = dataclasses.field(default_factory=DpoSection)
    iterate: IterateSection = dataclasses.field(default_factory=IterateSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{"model": {"path": ...}, ...}: what ConfigDict.to_dict() gives for the same config."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # {"model": ModelSection, ...}


def keys() -> list[tuple[str, dataclasses.Field]]:
    """("section.key", its dataclass field) for every key, in schema order."""
    return [(f"{name}.{f.name}", f) for name, section in SECTIONS.items() for f in dataclasses.fields(section)]


def base_config():
    """Every key with its default, as the ml_collections.ConfigDict config files start from
    (`configs/*.py`: `c = base_config(); c.train.steps = 100; return c`)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    for name, section in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(dataclasses.asdict(section()))
    return c


def key_table() -> list[dict[str, Any]]:
    """[{"key": "train.steps", "default": 0, "type": "int", "doc": "..."}, ...] for every key, in
    schema order (the manual's key table)."""
    return [{"key": name, "default": f.default, "type": f.type.__name__, "doc": f.metadata["doc"]}
            for name, f in keys()]


def section_docs() -> dict[str, str]:
    """{"train": "The run: ...", ...}: each section's one-line doc."""
    return {name: section.__doc__.strip() for name, section in SECTIONS.items()}


def from_dict(values: Mapping[str, Any]) -> Config:
    """The typed Config of `values` ({"train": {"steps": 100}, ...}, or a ConfigDict); a key
    left out takes its default. Raises ConfigError naming the key for a key that does not
    exist or a value of the wrong type (an int is taken for a float key, a bool for no number)."""
    if not isinstance(values, Mapping) and not hasattr(values, "items"):
        raise ConfigError(f"a config is a mapping of sections ({', '.join(SECTIONS)}), got {type(values).__name__}")
    unknown = [name for name in values if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"config key {unknown[0]!r} does not exist{_did_you_mean(unknown[0], SECTIONS)}")
    sections = {}
    for name, section in SECTIONS.items():
        given = values.get(name) or {}
        if not hasattr(given, "items"):
            raise ConfigError(f"config key {name}: must be a section of keys, got {given!r}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        for k in given:
            if k not in fields:
                raise ConfigError(f"config key '{name}.{k}' does not exist{_did_you_mean(k, fields)}")
        sections[name] = section(**{k: check_type(f"{name}.{k}", v, fields[k].type) for k, v in given.items()})
    return Config(**sections)


def typed(config) -> Config:
    """`config` (a ConfigDict, a dict or a Config) as a typed Config; see `from_dict`."""
    return config if isinstance(config, Config) else from_dict(config)


def check_type(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is kind or (kind is float and isinstance(value, float)):
        return value
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
    hint = " (quote it: a string)" if kind is str else ""
    raise ConfigError(f"config key {name}: must be {wanted} ({kind.__name__}){hint}, got {value!r} "
                      f"({type(value).__name__})")


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f'. Did you mean "{close[0]}"?' if close else ""


__all__ = ["Config", "DataSection", "DpoSection", "IterateSection", "LoraSection", "MeshSection", "ModelSection", "OptimSection",
           "SECTIONS", "TrainSection", "base_config", "check_type", "from_dict", "key", "key_table", "keys",
           "section_docs", "typed"]
