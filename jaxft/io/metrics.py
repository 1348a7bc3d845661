"""Run metrics: WORKDIR/metrics.jsonl, the trackers (TensorBoard, W&B), MFU, and plots.

Metric names follow TRL (loss, learning_rate, grad_norm, num_tokens, mean_token_accuracy,
rewards/*, logps/*, logits/*; eval metrics prefixed `eval_`) plus tokens_per_sec, step_time
and mfu. One JSON object per logged step: {"step": N, "loss": ..., ...}, plus one per
sample step of `train.sample_every`: {"step": N, "samples": [...]}.

Kills: metrics.jsonl is appended one line at a time, so a run killed mid-append leaves at most
a torn last line. Readers skip it with a warning naming the file and line; a resumed run
rewrites the file without it (atomically, `jaxft.io.atomic`). A damaged line before the last
is not a kill's doing: reading fails naming the file and line.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import jax

from jaxft.errors import DataError, PathError
from jaxft.io import atomic, trackers
from jaxft.models.lora import num_adapter_params

log = logging.getLogger("jaxft")

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPU) report no MFU unless
# `train.peak_flops` is set.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def device_peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def linear_mixer_flops(cfg) -> float:
    """Forward + backward FLOPs per token of one Gated DeltaNet layer's chunked delta rule (its
    projections are matmul params): per value head, q S, k S and the update k^T delta (2 K V
    each) and the chunk's (q k^T) delta and inverse products (2 L V each); per key head q k^T
    and k k^T (2 L K each); x 3 for the backward."""
    from jaxft.models.gated_deltanet import DEFAULT_CHUNK

    L = cfg.linear_chunk_size or DEFAULT_CHUNK
    K, V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    forward = cfg.linear_num_value_heads * (6 * K * V + 4 * L * V) + cfg.linear_num_key_heads * 4 * L * K
    return 3.0 * forward


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul params + causal attention scores (on the
    attention layers; a linear-attention layer's chunked rule instead: `linear_mixer_flops`). With
    LoRA the frozen base needs no weight gradients: 4 x its matmul params, 6 x the adapters'.
    A mixture of experts counts the params a token uses (its k experts, not all)."""
    matmul_params = cfg.num_params(active=True) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    # QK^T and PV (causal ~ 1/2) over the head dims; multi-head latent attention's keys are
    # D_n + D_r wide, its values D_v.
    dims = (cfg.dim_per_head if cfg.kv_lora_rank is None
            else (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2)
    specs = cfg.layer_specs()
    linear = 0 if specs is None else sum(spec.linear for spec in specs)
    attention = 6 * (cfg.num_layers - linear) * cfg.num_heads * dims * seq_len + linear * linear_mixer_flops(cfg)
    if cfg.lora is not None:
        return 4.0 * matmul_params + 6.0 * num_adapter_params(cfg, active=True) + attention
    return 6.0 * matmul_params + attention


class MetricsWriter:
    """Appends metrics to metrics.jsonl and sends them to the run's trackers (process 0 only).

    Rows are {"step": N, "loss": ..., ...}; a sample-generation row is {"step": N, "samples":
    [{"prompt": ..., "completion": ...}, ...]} (readers of scalars skip it: it has no "loss").
    """

    def __init__(self, workdir: str | Path, *, report_to: str = "tensorboard", start_step: int = 0,
                 config: dict | None = None):
        """`report_to`: tracker names as `train.report_to` takes them (`jaxft.io.trackers`;
        "none" = metrics.jsonl only). `config`: the run's config dict, logged to the trackers.
        `start_step`: the step the run starts (or resumes) from. Rows past it were written
        by a run killed after its last checkpoint; the steps are redone, so they are dropped
        and metrics.jsonl keeps one row per step (and one samples row per sample step)."""
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.final: dict[str, float] = {}  # the last value of every scalar: the run's summary
        self._trackers: list[trackers.Tracker] = []
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():  # a torn last line is dropped too
                kept = [row for row in read_rows(self.path, torn="removed: the resumed run rewrites the file "
                                                 "without it") if row["step"] <= start_step]
                atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            self._trackers = trackers.open_trackers(report_to, workdir, config or {})

    def _append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._append({"step": int(step), **clean})
        scalars = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
        self.final.update(scalars)
        for tracker in self._trackers:
            tracker.log(int(step), scalars)

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """One row of sample generations: `samples` = [{"prompt": str, "completion": str}, ...]."""
        if not self.enabled:
            return
        self._append({"step": int(step), "samples": samples})
        for tracker in self._trackers:
            tracker.log_samples(int(step), samples)

    def close(self, *, completed: bool = False) -> None:
        """Ends the trackers' runs; a completed run's final metrics go to their summaries."""
        for tracker in self._trackers:
            tracker.finish(dict(self.final) if completed else None)
        self._trackers = []


def _plain(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return v
    return v if math.isfinite(v) else str(v)  # JSON has no NaN; keep it visible as a string


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (a torn last line skipped with a warning)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise PathError(f"{path} not found: is {workdir} a jaxft workdir?")
    return read_rows(path)


def read_rows(path: Path, *, torn: str = "skipped (resuming the run repairs the file)") -> list[dict]:
    """The rows of a metrics.jsonl file. A last line that is not a whole row is what a kill
    mid-append leaves: skipped, with a warning naming the file and line and saying `torn`
    (what becomes of it). A damaged line before it raises ValueError naming file and line."""
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row, problem = _parse_row(line)
        if problem is None:
            rows.append(row)
        elif i == last:
            log.warning("%s line %d is not a whole row (%s), as a run killed while writing it leaves it: %s",
                        path, i + 1, problem, torn)
        else:
            raise DataError(f"{path} line {i + 1}: {problem}; only the last line of metrics.jsonl can be "
                             "torn by a kill, so this file was edited or damaged: fix or delete that line")
    return rows


def _parse_row(line: bytes) -> tuple[dict | None, str | None]:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"not a JSON row ({err})"
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return None, 'not a metrics row ({"step": N, ...})'
    return row, None


def plot(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Writes a PNG of loss (train and eval) and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    out = Path(out or Path(workdir) / "metrics.png")
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
        if pts:
            ax_loss.plot(*zip(*pts), style, label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    lr = [(r["step"], r["learning_rate"]) for r in rows if isinstance(r.get("learning_rate"), float)]
    if lr:
        ax_lr.plot(*zip(*lr))
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning_rate")
    fig.suptitle(str(workdir))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic.write_bytes(out, buffer.getvalue())
    return out
