"""Writes tests/golden/dpo_losses.json: DPO losses and metrics computed by an independent plain
NumPy (float64) transcription of TRL's `DPOTrainer` loss code, for fixed inputs.

Written separately from jaxft (it imports nothing from it) so that tests/test_losses.py checks
jaxft against TRL's formulas rather than against itself. Run from the repository root:

    python tests/golden/make_dpo_golden.py

Follows TRL v1.x (`_compute_loss`): f-divergence scores feed sigmoid/hinge/ipo/exo/robust/
discopop/sigmoid_norm; the others use the plain log-ratios; ipo and sigmoid_norm divide the
scores by completion length (clamped to 1); sft is the token-mean NLL of the chosen completions.
Two documented choices beyond TRL 1.x: `sigmoid` keeps cDPO label smoothing (TRL <= 0.2x), and
`bco_pair` subtracts a given running mean of rewards (older TRL's delta; 0 is TRL 1.x).
"""

import json
import math
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).with_name("dpo_losses.json")


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def trl_reference(inp, loss_type, beta=0.1, label_smoothing=0.0, loss_weights=None,
                  f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                  bco_running_mean=0.0):
    """Returns (loss, metrics) as TRL's DPOTrainer would log them, in float64."""
    c, r = np.array(inp["chosen_logps"]), np.array(inp["rejected_logps"])
    rc, rr = np.array(inp["ref_chosen_logps"]), np.array(inp["ref_rejected_logps"])
    nc = np.maximum(np.array(inp["chosen_lengths"]), 1.0)
    nr = np.maximum(np.array(inp["rejected_lengths"]), 1.0)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(types)
    eps = label_smoothing

    clr, rlr = c - rc, r - rr
    if f_divergence_type == "reverse_kl":
        cs, rs = clr, rlr
    elif f_divergence_type == "forward_kl":
        cs, rs = 1 - np.exp(-clr), 1 - np.exp(-rlr)
    elif f_divergence_type == "js_divergence":
        cs, rs = math.log(2) + logsigmoid(clr), math.log(2) + logsigmoid(rlr)
    elif f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            cs, rs = clr, rlr
        else:
            cs = (np.exp(np.minimum((a - 1) * clr, 80.0)) - 1) / (a - 1)
            rs = (np.exp(np.minimum((a - 1) * rlr, 80.0)) - 1) / (a - 1)
    else:
        raise ValueError(f_divergence_type)
    d = cs - rs

    total = 0.0
    for kind, weight in zip(types, weights):
        if kind == "sigmoid":
            per = -logsigmoid(beta * d) * (1 - eps) - logsigmoid(-beta * d) * eps
        elif kind == "hinge":
            per = np.maximum(0.0, 1 - beta * d)
        elif kind == "ipo":
            per = (cs / nc - rs / nr - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            x = beta * d
            per = sigmoid(x) * (logsigmoid(x) - np.log1p(-eps)) + sigmoid(-x) * (logsigmoid(-x) - np.log(eps))
        elif kind == "nca_pair":
            cw, rw = beta * clr, beta * rlr
            per = -logsigmoid(cw) - 0.5 * logsigmoid(-cw) - 0.5 * logsigmoid(-rw)
        elif kind == "robust":
            clean = -(1 - eps) * logsigmoid(beta * d)
            flipped = -eps * logsigmoid(-beta * d)
            per = (clean - flipped) / (1 - 2 * eps)
        elif kind == "bco_pair":
            per = -logsigmoid(beta * clr - bco_running_mean) - logsigmoid(-(beta * rlr - bco_running_mean))
        elif kind == "sppo_hard":
            per = (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
        elif kind == "aot":
            delta = np.sort(c - r) - np.sort(rc - rr)
            per = -logsigmoid(beta * delta) * (1 - eps) - logsigmoid(-beta * delta) * eps
        elif kind == "aot_unpaired":
            delta = np.sort(clr) - np.sort(rlr)
            per = -logsigmoid(beta * delta) * (1 - eps) - logsigmoid(-beta * delta) * eps
        elif kind == "apo_zero":
            per = (1 - sigmoid(beta * clr)) + sigmoid(beta * rlr)
        elif kind == "apo_down":
            per = sigmoid(beta * clr) + (1 - sigmoid(beta * (clr - rlr)))
        elif kind == "discopop":
            x = beta * d
            m = sigmoid(x / discopop_tau)
            per = -logsigmoid(x) * (1 - m) + np.exp(-x) * m
        elif kind == "sft":
            # cross-entropy over every chosen completion token of the batch
            per = np.full_like(c, -c.sum() / nc.sum())
        elif kind == "sigmoid_norm":
            per = -logsigmoid(beta * (cs / nc - rs / nr))
        else:
            raise ValueError(kind)
        total += per.mean() * weight

    cw, rw = beta * clr, beta * rlr
    metrics = {
        "loss": total,
        "rewards/chosen": cw.mean(),
        "rewards/rejected": rw.mean(),
        "rewards/accuracies": (cw > rw).astype(np.float64).mean(),
        "rewards/margins": (cw - rw).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
    }
    if "bco_pair" in types:
        metrics["bco/reward_mean"] = np.concatenate([cw, rw]).mean()
    return float(total), {k: float(v) for k, v in metrics.items()}


def make_inputs(seed=0, num_pairs=12):
    rng = np.random.default_rng(seed)
    chosen_lengths = rng.integers(4, 40, num_pairs).astype(np.float32)
    rejected_lengths = rng.integers(4, 40, num_pairs).astype(np.float32)
    # Sequence log-probs scale with length (about -1.5 nats a token). The policy moves a few nats
    # from the reference: enough that beta * margin is O(1) and the batch sorts of aot reorder
    # pairs, small enough that forward_kl's exp(-logratio) stays moderate.
    ref_chosen = (-1.5 * chosen_lengths + rng.normal(0, 2, num_pairs)).astype(np.float32)
    ref_rejected = (-1.5 * rejected_lengths + rng.normal(0, 2, num_pairs)).astype(np.float32)
    chosen = (ref_chosen + rng.normal(1.0, 3.0, num_pairs)).astype(np.float32)
    rejected = (ref_rejected + rng.normal(-1.0, 3.0, num_pairs)).astype(np.float32)
    # Exact float32 values (as Python floats) so both sides start from identical numbers.
    return {k: [float(x) for x in v] for k, v in dict(
        chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    ).items()}


ALL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# Settings each type needs to be valid (exo needs eps > 0).
BASE = {"exo_pair": {"label_smoothing": 1e-3}}

CASES = [{"loss_type": t, **BASE.get(t, {})} for t in ALL_TYPES] + [
    {"loss_type": "sigmoid", "beta": 0.5},
    {"loss_type": "ipo", "beta": 0.5},
    {"loss_type": "hinge", "beta": 1.0},
    {"loss_type": "aot", "beta": 1.0},
    {"loss_type": "sigmoid", "label_smoothing": 0.2},
    {"loss_type": "robust", "label_smoothing": 0.1},
    {"loss_type": "exo_pair", "label_smoothing": 0.05, "beta": 0.3},
    {"loss_type": "aot", "label_smoothing": 0.1},
    {"loss_type": "aot_unpaired", "label_smoothing": 0.1},
    {"loss_type": "bco_pair", "bco_running_mean": 0.05},
    {"loss_type": "discopop", "discopop_tau": 0.5},
    {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"},
    {"loss_type": "sigmoid", "f_divergence_type": "js_divergence"},
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence"},
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
    {"loss_type": "ipo", "f_divergence_type": "js_divergence"},
    {"loss_type": "sigmoid_norm", "f_divergence_type": "forward_kl"},
    {"loss_type": "sigmoid_norm", "f_divergence_type": "alpha_divergence"},
    {"loss_type": "ipo", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
    {"loss_type": "hinge", "f_divergence_type": "alpha_divergence"},
    {"loss_type": "exo_pair", "label_smoothing": 1e-3, "f_divergence_type": "forward_kl"},
    {"loss_type": "robust", "label_smoothing": 0.1, "f_divergence_type": "js_divergence"},
    {"loss_type": "discopop", "f_divergence_type": "forward_kl"},
    {"loss_type": "sft", "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["sigmoid", "ipo"]},
]


def main():
    inputs = make_inputs()
    cases = []
    for kwargs in CASES:
        loss, metrics = trl_reference(inputs, **kwargs)
        cases.append({"kwargs": kwargs, "loss": loss, "metrics": metrics})
    OUT.write_text(json.dumps({"inputs": inputs, "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
