"""The optax optimizer from the `optim.*` config: schedule, clipping, AdamW, decay mask.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches
and normalises by the target tokens of the whole batch (see `jaxft.steps.common`), so batch 8 x
accumulate 1 and batch 1 x accumulate 8 give the same update.
"""

from __future__ import annotations

from jaxft.errors import ConfigError
import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(*, lr: float, schedule: str, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine / linear decay to
    `lr * min_lr_ratio` at `total_steps`, or constant."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {lr}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"optim.warmup_steps={warmup_steps} must be between 0 and train.steps={total_steps}")
    decay_steps = max(total_steps - warmup_steps, 1)
    end = lr * min_lr_ratio
    if schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params) -> dict:
    """True for leaves that get weight decay: not norms, not biases (as HF Trainer / TRL), not
    Gemma 4's layer scalars (checkpoint constants the model never trains)."""

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        return not any("norm" in n or "bias" in n or n == "layer_scalar" for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, lr: float, schedule: str = "cosine", warmup_steps: int = 0, total_steps: int,
                   weight_decay: float = 0.0, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, min_lr_ratio: float = 0.0):
    """(optax transformation, schedule). Clipping by global norm happens before AdamW."""
    sched = make_schedule(lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                          total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    parts = []
    if clip_norm and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched


def warmup_steps_of(optim_cfg, total_steps: int) -> int:
    """optim.warmup_steps, else optim.warmup_ratio of the total steps (as HF Trainer / TRL)."""
    if optim_cfg.warmup_steps > 0:
        return optim_cfg.warmup_steps
    return int(round(optim_cfg.warmup_ratio * total_steps))


def optimizer_from_config(optim_cfg, total_steps: int):
    """`make_optimizer` with the fields of the `optim` config section."""
    return make_optimizer(
        lr=optim_cfg.lr, schedule=optim_cfg.schedule, warmup_steps=warmup_steps_of(optim_cfg, total_steps),
        total_steps=total_steps, weight_decay=optim_cfg.weight_decay, clip_norm=optim_cfg.clip_norm,
        b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, min_lr_ratio=optim_cfg.min_lr_ratio,
    )
