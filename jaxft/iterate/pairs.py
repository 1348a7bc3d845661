"""Training records from scored samples: preference pairs (best vs worst) or the best sample alone
(rejection-sampling SFT). Pure Python / numpy: records, completions and rewards in, records out."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxft.data.prompts import prompt_of
from jaxft.errors import ConfigError

PAIR_MODES = ("best_worst", "sft")


def _answer(prompt, completion: str):
    """The completion in the prompt's form: a string, or one assistant message."""
    return completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]


def build_pairs(records: Sequence[dict], completions: Sequence[Sequence[str]], rewards, *,
                mode: str = "best_worst", min_margin: float = 0.0,
                pairs_per_prompt: int = 1) -> tuple[list[dict], dict]:
    """Training records from K scored completions of each of P prompts.

    rewards: [P, K]. mode "best_worst": for each prompt, its highest-reward completion as chosen
      and its lowest as rejected (the first of equal rewards), in TRL's preference format, when
      their margin is > 0 and >= `min_margin`; a prompt whose samples all score the same is
      dropped as a tie. With `pairs_per_prompt` N > 1, up to N disjoint pairs a prompt: the
      i-th best against the i-th worst for i = 1, 2, ... while their margin passes (as Iterative
      RPO pairs several right with wrong answers), so a prompt whose samples disagree more
      weighs more; ties and small margins count the first pair only. mode "sft": the best
      completion as a prompt-completion record when no other sample beats it (always) and its
      reward is >= `min_margin` (the acceptance bar).
    An empty (or whitespace-only) completion is never chosen or rejected: the data loader refuses
    an empty reply, so it is left out of the choice, and a prompt left with fewer than two
    completions (one for "sft") is dropped and counted as "dropped_empty".
    Each record also carries "prompt_index" and the rewards it was chosen by.
    Returns (records, counts {"prompts", "pairs" or "accepted", "dropped_ties", "dropped_margin",
    "dropped_empty"}).
    """
    if mode not in PAIR_MODES:
        raise ConfigError(f"pairs: unknown mode {mode!r}; one of {', '.join(PAIR_MODES)}")
    if pairs_per_prompt < 1:
        raise ConfigError(f"iterate.pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    rewards_PK = np.asarray(rewards, np.float64)
    if rewards_PK.shape != (len(records), len(completions[0]) if len(completions) else 0):
        raise ValueError(f"rewards {rewards_PK.shape} do not match {len(records)} prompts x K completions")
    out, ties, small, empty = [], 0, 0, 0
    for i, (record, row, r_K) in enumerate(zip(records, completions, rewards_PK)):
        prompt = prompt_of(record)
        usable = [j for j, text in enumerate(row) if text.strip()]
        if len(usable) < (1 if mode == "sft" else 2):
            empty += 1
            continue
        ranked = sorted(usable, key=lambda j: -r_K[j])  # stable: the first of equal rewards first
        rising = sorted(usable, key=lambda j: r_K[j])
        best, worst = ranked[0], rising[0]
        if mode == "sft":
            if r_K[best] < min_margin:
                small += 1
                continue
            out.append({"prompt": prompt, "completion": _answer(prompt, row[best]), "prompt_index": i,
                        "reward": float(r_K[best])})
            continue
        margin = r_K[best] - r_K[worst]
        if margin <= 0:
            ties += 1
        elif margin < min_margin:
            small += 1
        else:
            n = min(pairs_per_prompt, len(usable) // 2)  # disjoint: at most half the samples chosen
            for chosen, rejected in zip(ranked[:n], rising[:n]):
                gap = r_K[chosen] - r_K[rejected]
                if gap <= 0 or gap < min_margin:
                    break  # the next pairs are closer still (the first passed the checks above)
                out.append({"prompt": prompt, "chosen": _answer(prompt, row[chosen]),
                            "rejected": _answer(prompt, row[rejected]), "prompt_index": i,
                            "chosen_reward": float(r_K[chosen]), "rejected_reward": float(r_K[rejected])})
    counts = {"prompts": len(records), "accepted" if mode == "sft" else "pairs": len(out),
              "dropped_ties": ties, "dropped_margin": small, "dropped_empty": empty}
    return out, counts
