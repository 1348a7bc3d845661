"""DPO-family preference losses over sequence log-probs, with TRL's names and formulas.

Pure `jax.numpy`. Inputs are float [P] sequence log-probs (target log-probs summed over each
completion), one entry per preference pair. Formulas follow TRL's `DPOTrainer` (v1.x): the
policy/reference log-ratios go through the chosen f-divergence to give "scores", and each loss
type is one small function in `LOSS_FNS` with its formula in the docstring. Notation in the
docstrings: beta = `beta`, eps = `label_smoothing`, lr_c / lr_r = chosen / rejected log-ratios
(policy minus reference), s_c / s_r = their f-divergence scores, d = s_c - s_r,
n_c / n_r = completion lengths (tokens), ls(x) = log(sigmoid(x)), sig = sigmoid.

Reference-free DPO: pass zeros for the reference log-probs.

Public as `jaxft.losses.dpo_loss` and friends.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError

# Short names so the code reads like the formulas in the docstrings.
ls = jax.nn.log_sigmoid
sig = jax.nn.sigmoid


class PairTerms(NamedTuple):
    """Everything a loss function may read. Arrays are float32 [P]; padding slots hold zeros
    (and lengths of 1) so every loss stays finite there; `mask` marks real pairs."""

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_logratios: jax.Array  # lr_c = chosen_logps - ref_chosen_logps
    rejected_logratios: jax.Array  # lr_r
    chosen_scores: jax.Array  # s_c = f-divergence transform of lr_c
    rejected_scores: jax.Array  # s_r
    chosen_lengths: jax.Array | None  # n_c, clamped to >= 1
    rejected_lengths: jax.Array | None  # n_r, clamped to >= 1
    mask: jax.Array  # bool [P], True on real pairs
    beta: float
    label_smoothing: float
    discopop_tau: float
    bco_running_mean: jax.Array | float


# ---------------------------------------------------------------- f-divergence "scores"


def _alpha_scores(logratios, coef):
    # (t^(a-1) - 1) / (a - 1) with t = exp(logratio); a -> 1 is the reverse-KL limit, log t.
    if abs(coef - 1.0) < 1e-6:
        return logratios
    # Clamp the exponent as TRL does so exp() stays finite in float32.
    return (jnp.exp(jnp.minimum((coef - 1.0) * logratios, 80.0)) - 1.0) / (coef - 1.0)


F_DIVERGENCES: dict[str, Callable] = {
    # f'(t) for t = pi / pi_ref, written in terms of logratio = log t.
    "reverse_kl": lambda lr, coef: lr,  # log t: standard DPO
    "forward_kl": lambda lr, coef: 1.0 - jnp.exp(-lr),  # 1 - 1/t
    "js_divergence": lambda lr, coef: math.log(2.0) + ls(lr),  # log(2t / (1 + t))
    "alpha_divergence": _alpha_scores,
}

# The f-DPO reparameterisation leaves a beta * log Z(x) term that cancels only in the
# chosen-minus-rejected difference, so only these losses generalise (TRL rejects the rest).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


# ---------------------------------------------------------------- loss functions, per pair [P]


def _smoothed_sigmoid(x, eps):
    # cDPO: the label is flipped with probability eps.
    return -(1.0 - eps) * ls(x) - eps * ls(-x)


def sigmoid_loss(t: PairTerms):
    """DPO (Rafailov et al. 2023), with cDPO label smoothing:
    -(1 - eps) ls(beta d) - eps ls(-beta d). (TRL 1.x ignores eps here; with eps = 0 they agree.)"""
    return _smoothed_sigmoid(t.beta * (t.chosen_scores - t.rejected_scores), t.label_smoothing)


def hinge_loss(t: PairTerms):
    """SLiC hinge: relu(1 - beta d)."""
    return jax.nn.relu(1.0 - t.beta * (t.chosen_scores - t.rejected_scores))


def ipo_loss(t: PairTerms):
    """IPO (Azar et al. 2023, eq. 17) on length-normalised scores, beta playing tau:
    (s_c / n_c - s_r / n_r - 1 / (2 beta))^2."""
    delta = t.chosen_scores / t.chosen_lengths - t.rejected_scores / t.rejected_lengths
    return (delta - 1.0 / (2.0 * t.beta)) ** 2


def exo_pair_loss(t: PairTerms):
    """EXO-pref (Ji et al. 2024, eq. 16), KL from the eps-smoothed label to the model's pair
    distribution: sig(beta d) (ls(beta d) - log(1 - eps)) + sig(-beta d) (ls(-beta d) - log eps)."""
    x = t.beta * (t.chosen_scores - t.rejected_scores)
    eps = t.label_smoothing
    return sig(x) * (ls(x) - math.log1p(-eps)) + sig(-x) * (ls(-x) - math.log(eps))


def nca_pair_loss(t: PairTerms):
    """NCA (Chen et al. 2024): -ls(beta lr_c) - ls(-beta lr_c) / 2 - ls(-beta lr_r) / 2."""
    chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -ls(chosen) - 0.5 * ls(-chosen) - 0.5 * ls(-rejected)


def robust_loss(t: PairTerms):
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps < 1/2:
    (-(1 - eps) ls(beta d) + eps ls(-beta d)) / (1 - 2 eps)."""
    x, eps = t.beta * (t.chosen_scores - t.rejected_scores), t.label_smoothing
    return (-(1.0 - eps) * ls(x) + eps * ls(-x)) / (1.0 - 2.0 * eps)


def bco_pair_loss(t: PairTerms):
    """BCO on pairs (Jung et al. 2024): -ls(beta lr_c - delta) - ls(-(beta lr_r - delta)).
    delta = `bco_running_mean`, the caller's running mean of the rewards (TRL 1.x uses 0)."""
    delta = t.bco_running_mean
    return -ls(t.beta * t.chosen_logratios - delta) - ls(-(t.beta * t.rejected_logratios - delta))


def sppo_hard_loss(t: PairTerms):
    """SPPO with hard win probabilities (Wu et al. 2024):
    (lr_c - 1 / (2 beta))^2 + (lr_r + 1 / (2 beta))^2."""
    half = 0.5 / t.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2


def _sorted_pairs(a, b, t: PairTerms):
    """Sorts a and b ([P] each) independently over the real pairs; returns (a_sorted - b_sorted)
    with zeros past the real count, and a function that puts per-rank values back on real-pair
    slots (so the usual masked mean over `t.mask` averages them)."""
    num_pairs = a.shape[0]
    # Padding sorts last (+inf), so both sorted arrays hold the n real values first.
    a_sorted = jnp.sort(jnp.where(t.mask, a, jnp.inf))
    b_sorted = jnp.sort(jnp.where(t.mask, b, jnp.inf))
    valid = jnp.arange(num_pairs) < jnp.sum(t.mask)
    delta = jnp.where(valid, a_sorted - b_sorted, 0.0)  # inf - inf never reaches the loss
    # Slot indices, real pairs first (stable): rank i lands on the i-th real slot.
    slots = jnp.argsort(jnp.logical_not(t.mask), stable=True)
    return delta, lambda per_rank: jnp.zeros_like(per_rank).at[slots].set(jnp.where(valid, per_rank, 0.0))


def aot_loss(t: PairTerms):
    """AOT paired (Melnyk et al. 2024): with u = sort(logps_c - logps_r) and
    v = sort(ref_c - ref_r) over the batch, -(1 - eps) ls(beta (u - v)) - eps ls(-beta (u - v))."""
    delta, unsort = _sorted_pairs(t.chosen_logps - t.rejected_logps, t.ref_chosen_logps - t.ref_rejected_logps, t)
    return unsort(_smoothed_sigmoid(t.beta * delta, t.label_smoothing))


def aot_unpaired_loss(t: PairTerms):
    """AOT unpaired: with u = sort(lr_c), v = sort(lr_r) over the batch,
    -(1 - eps) ls(beta (u - v)) - eps ls(-beta (u - v))."""
    delta, unsort = _sorted_pairs(t.chosen_logratios, t.rejected_logratios, t)
    return unsort(_smoothed_sigmoid(t.beta * delta, t.label_smoothing))


def apo_zero_loss(t: PairTerms):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 - sig(beta lr_c) + sig(beta lr_r)."""
    return 1.0 - sig(t.beta * t.chosen_logratios) + sig(t.beta * t.rejected_logratios)


def apo_down_loss(t: PairTerms):
    """APO-down (eq. 8): sig(beta lr_c) + 1 - sig(beta (lr_c - lr_r))."""
    return sig(t.beta * t.chosen_logratios) + 1.0 - sig(t.beta * (t.chosen_logratios - t.rejected_logratios))


def discopop_loss(t: PairTerms):
    """DiscoPOP (Chris Lu et al. 2024, eq. 5), x = beta d, m = sig(x / tau):
    -ls(x) (1 - m) + exp(-x) m."""
    x = t.beta * (t.chosen_scores - t.rejected_scores)
    modulation = sig(x / t.discopop_tau)
    # exp(-x) * m as exp(-x + ls(x / tau)): equal, but no inf * 0 = NaN for very negative x.
    return -ls(x) * (1.0 - modulation) + jnp.exp(-x + ls(x / t.discopop_tau))


def sft_pair_loss(t: PairTerms):
    """NLL of the chosen completions (MPO's SFT term), a token mean over the batch, the same for
    every pair: -sum(logps_c) / sum(n_c) over real pairs."""
    tokens = jnp.sum(jnp.where(t.mask, t.chosen_lengths, 0.0))
    nll = -jnp.sum(t.chosen_logps) / jnp.maximum(tokens, 1.0)  # padding slots hold 0 log-prob
    return jnp.broadcast_to(nll, t.chosen_logps.shape)


def sigmoid_norm_loss(t: PairTerms):
    """Length-normalised DPO: -ls(beta (s_c / n_c - s_r / n_r))."""
    return -ls(t.beta * (t.chosen_scores / t.chosen_lengths - t.rejected_scores / t.rejected_lengths))


LOSS_FNS: dict[str, Callable[[PairTerms], jax.Array]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_pair_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}
DPO_LOSS_TYPES = tuple(LOSS_FNS)
# Loss types that read completion lengths, and which lengths.
_NEEDS_LENGTHS = {"ipo": ("chosen", "rejected"), "sigmoid_norm": ("chosen", "rejected"), "sft": ("chosen",)}


# ---------------------------------------------------------------- validation and entry point


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_f_divergence(types, f_divergence_type, f_alpha_divergence_coef):
    if f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(f"dpo.f_divergence_type: unknown {f_divergence_type!r}; valid: "
                         f"{', '.join(F_DIVERGENCES)}")
    if f_divergence_type != "reverse_kl":
        unsupported = [n for n in types if n not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ConfigError(f"dpo.f_divergence_type={f_divergence_type!r} only works with loss types "
                             f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; dpo.loss_type has {unsupported}")
    alpha = f_alpha_divergence_coef
    if f_divergence_type == "alpha_divergence" and _is_number(alpha) and not alpha > 0:
        raise ConfigError(f"dpo.f_alpha_divergence_coef must be > 0, got {f_alpha_divergence_coef}")


def validate_dpo_settings(loss_type, beta, label_smoothing, loss_weights=None, *,
                          f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05):
    """Checks DPO settings from Python values alone (usable at config time, outside jit).

    Args:
      loss_type: a name from `DPO_LOSS_TYPES`, a comma-separated string of names, or a sequence.
      beta, label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef,
        discopop_tau: as `dpo_loss`. Numeric checks are skipped for non-Python values (arrays).

    Returns:
      (loss_types tuple[str], loss_weights tuple[float]), normalised.

    Raises:
      ValueError naming the config key (`dpo.beta`, `dpo.loss_type`, `dpo.label_smoothing`,
      `dpo.loss_weights`, `dpo.f_divergence_type`, ...).
    """
    names = loss_type.split(",") if isinstance(loss_type, str) else list(loss_type)
    types = tuple(str(n).strip() for n in names if str(n).strip())
    if not types:
        raise ConfigError(f"dpo.loss_type is empty; choose from {', '.join(DPO_LOSS_TYPES)}")
    for name in types:
        if name not in LOSS_FNS:
            raise ConfigError(f"dpo.loss_type: unknown loss type {name!r}; valid types: "
                             f"{', '.join(DPO_LOSS_TYPES)}")
    if _is_number(beta) and not beta > 0:
        raise ConfigError(f"dpo.beta must be > 0, got {beta}")
    if _is_number(label_smoothing):
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 1), got {label_smoothing}")
        if "exo_pair" in types and label_smoothing == 0.0:
            raise ConfigError("dpo.label_smoothing must be > 0 for dpo.loss_type 'exo_pair' (it is EXO's "
                             "epsilon; the paper suggests 1e-3)")
        if "robust" in types and label_smoothing >= 0.5:
            raise ConfigError(f"dpo.label_smoothing must be < 0.5 for dpo.loss_type 'robust' (a label-flip "
                             f"rate), got {label_smoothing}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(types):
            raise ConfigError(f"dpo.loss_weights has {len(weights)} weights for {len(types)} loss types "
                             f"{list(types)}; give one weight per dpo.loss_type entry")
    _check_f_divergence(types, f_divergence_type, f_alpha_divergence_coef)
    if "discopop" in types and _is_number(discopop_tau) and not discopop_tau > 0:
        raise ConfigError(f"dpo.discopop_tau must be > 0, got {discopop_tau}")
    return types, weights


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)


def _require_lengths(types, chosen_lengths, rejected_lengths):
    lengths = {"chosen": chosen_lengths, "rejected": rejected_lengths}
    for name in types:
        for side in _NEEDS_LENGTHS.get(name, ()):
            if lengths[side] is None:
                raise ValueError(f"dpo.loss_type {name!r} needs {side}_lengths (completion token counts)")


def pair_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, pair_mask=None,
               chosen_lengths=None, rejected_lengths=None, beta=0.1, label_smoothing=0.0,
               f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
               bco_running_mean=0.0) -> PairTerms:
    """The `PairTerms` every loss function reads, from `dpo_loss`'s arguments (same meanings):
    padding slots cleaned to zeros (lengths to 1), log-ratios and their f-divergence scores."""
    chosen_logps = jnp.asarray(chosen_logps, jnp.float32)
    mask = (jnp.ones(chosen_logps.shape, bool) if pair_mask is None
            else jnp.asarray(pair_mask).reshape(chosen_logps.shape) > 0)

    def clean(x, fill=0.0):
        # Padding slots may hold anything (even NaN); replace them before any arithmetic.
        return None if x is None else jnp.where(mask, jnp.asarray(x, jnp.float32), fill)

    pol_c, pol_r = clean(chosen_logps), clean(rejected_logps)
    ref_c, ref_r = clean(ref_chosen_logps), clean(ref_rejected_logps)
    lr_c, lr_r = pol_c - ref_c, pol_r - ref_r
    to_scores = F_DIVERGENCES[f_divergence_type]
    # Lengths clamp to >= 1 (as TRL's clamp(min=1)) so an empty completion never divides by 0.
    len_c, len_r = (None if x is None else jnp.maximum(clean(x, 1.0), 1.0)
                    for x in (chosen_lengths, rejected_lengths))
    return PairTerms(
        chosen_logps=pol_c, rejected_logps=pol_r, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
        chosen_logratios=lr_c, rejected_logratios=lr_r,
        chosen_scores=to_scores(lr_c, f_alpha_divergence_coef),
        rejected_scores=to_scores(lr_r, f_alpha_divergence_coef),
        chosen_lengths=len_c, rejected_lengths=len_r, mask=mask, beta=beta, label_smoothing=label_smoothing,
        discopop_tau=discopop_tau, bco_running_mean=bco_running_mean,
    )


def reward_metrics(loss, t: PairTerms, *, with_bco: bool = False) -> dict:
    """TRL's reward metrics, float32 means over real pairs (see `dpo_loss`). Reports, not
    objectives: no gradient flows through them."""
    mask = t.mask
    rewards_c, rewards_r = jax.lax.stop_gradient((t.beta * t.chosen_logratios, t.beta * t.rejected_logratios))
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "rewards/chosen": _masked_mean(rewards_c, mask),
        "rewards/rejected": _masked_mean(rewards_r, mask),
        "rewards/accuracies": _masked_mean((rewards_c > rewards_r).astype(jnp.float32), mask),
        "rewards/margins": _masked_mean(rewards_c - rewards_r, mask),
        "logps/chosen": _masked_mean(jax.lax.stop_gradient(t.chosen_logps), mask),
        "logps/rejected": _masked_mean(jax.lax.stop_gradient(t.rejected_logps), mask),
    }
    if with_bco:
        metrics["bco/reward_mean"] = 0.5 * (metrics["rewards/chosen"] + metrics["rewards/rejected"])
    return metrics


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             loss_type: str | Sequence[str] = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             loss_weights: Sequence[float] | None = None, chosen_lengths=None, rejected_lengths=None,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             pair_mask=None, discopop_tau: float = 0.05, bco_running_mean=0.0):
    """Preference loss and TRL's reward metrics for a batch of pairs.

    Args:
      chosen_logps, rejected_logps: float [P] policy sequence log-probs (summed over completion
        tokens).
      ref_chosen_logps, ref_rejected_logps: float [P] reference log-probs; zeros for
        reference-free training. Treated like any input: pass constants (a frozen reference's
        output or a precomputed table) so no gradient reaches the reference.
      loss_type: one name from `DPO_LOSS_TYPES`, or several (sequence or comma-separated string)
        combined as sum_k loss_weights[k] * mean_over_pairs(loss_k) (TRL's multi-loss / MPO).
      beta: > 0. label_smoothing: eps in [0, 1); cDPO for sigmoid, flip rate (< 0.5) for robust,
        EXO's epsilon (> 0) for exo_pair, smoothing for aot / aot_unpaired; others ignore it.
      loss_weights: one float per loss type; default 1.0 each.
      chosen_lengths, rejected_lengths: float/int [P] completion token counts; required by ipo,
        sigmoid_norm (both) and sft (chosen).
      f_divergence_type: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (with
        `f_alpha_divergence_coef`, TRL's default 0.5); only for `F_DIVERGENCE_LOSS_TYPES`.
      pair_mask: [P], 1 for real pairs, 0 for padding slots. Padding contributes nothing to the
        loss, the metrics or the gradients (whatever values it holds); means are over real
        pairs, and 0 real pairs give a loss of 0.
      discopop_tau: DiscoPOP temperature, > 0.
      bco_running_mean: bco_pair's delta, the running mean of rewards. TRL 1.x uses 0; to keep a
        running mean as older TRL did, update it from `metrics["bco/reward_mean"]` (this batch's
        mean of chosen and rejected rewards) between steps and pass it back in.

    Returns:
      loss: float32 scalar.
      metrics: float32 scalars, means over real pairs: `loss`, `rewards/chosen`
        (beta * (chosen - ref_chosen)), `rewards/rejected`, `rewards/accuracies` (chosen reward >
        rejected reward), `rewards/margins`, `logps/chosen`, `logps/rejected`; plus
        `bco/reward_mean` when bco_pair is used.
    """
    types, weights = validate_dpo_settings(
        loss_type, beta, label_smoothing, loss_weights, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau)
    _require_lengths(types, chosen_lengths, rejected_lengths)
    terms = pair_terms(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, pair_mask=pair_mask,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, beta=beta,
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
        bco_running_mean=bco_running_mean)
    loss = sum(w * _masked_mean(LOSS_FNS[name](terms), terms.mask) for name, w in zip(types, weights))
    loss = jnp.asarray(loss, jnp.float32)
    return loss, reward_metrics(loss, terms, with_bco="bco_pair" in types)
