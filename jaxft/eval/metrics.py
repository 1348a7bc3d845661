"""Generation-quality metrics, pure Python / numpy: exact-match accuracy, repetition ratio,
preference accuracy.

Eval loss and the DPO reward metrics are computed by the same steps training uses
(`jaxft.eval.likelihood`); nothing here duplicates them.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Callable, Sequence

import numpy as np

REPETITION_N = 3  # n-gram size of `repetition_ratio` (word 3-grams for text)

_ANSWER_IS_RE = re.compile(r"The answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_PLAIN_NUMBER_RE = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def repetition_ratio(outputs: Sequence[str | Sequence[int]], n: int = REPETITION_N) -> float:
    """Share of repeated n-grams in generated outputs (DeepSeek LLM's degeneration measure).

    For one output with n-grams g_1 .. g_M (M = length - n + 1), the ratio is
    #{i : g_i equals some g_j with j < i} / M: the fraction of its n-grams that already
    appeared earlier in the same output. The result is the mean of that over outputs.
    Units: a string is split on whitespace into words (no lower-casing or punctuation
    stripping, so "12." and "12" differ); a sequence of ints is used as token ids. The default
    n=3 means word 3-grams for text, the unit `evaluate_generation` reports.
    Edge cases: an output with fewer than n units has no n-grams and counts as 0; an empty
    list of outputs gives 0. Examples: "a b c d" -> 0; "a b a b a b" -> 2/4 = 0.5
    (a-b-a, b-a-b, then both again).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ratios = []
    for output in outputs:
        units = output.split() if isinstance(output, str) else list(output)
        grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
        if not grams:
            ratios.append(0.0)
            continue
        seen, repeats = set(), 0
        for gram in grams:
            repeats += gram in seen
            seen.add(gram)
        ratios.append(repeats / len(grams))
    return float(np.mean(ratios)) if ratios else 0.0


def normalize_answer(answer) -> str | None:
    """Canonical string for comparing answers: numbers lose thousands commas, leading zeros
    and trailing ".0" ("1,000" -> "1000", "07" -> "7", "12.50" -> "12.5", "-0" -> "0");
    anything else is only stripped. None stays None."""
    if answer is None:
        return None
    text = str(answer).strip()
    number = text.rstrip(".").replace(",", "")
    if not _PLAIN_NUMBER_RE.fullmatch(number):
        return text
    value = Decimal(number)  # exact, unlike float: "0.1" stays "0.1"
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_answer(text: str) -> str | None:
    """The answer a generation commits to: the number after the first "The answer is"
    (later repeats or a truncated tail must not change the verdict, as in
    `jaxft.quickstart.data.extract_answer`), else the last number in the text, else None.
    Normalised by `normalize_answer`."""
    match = _ANSWER_IS_RE.search(text)
    if match is not None:
        return normalize_answer(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def exact_match(
    predictions: Sequence[str],
    answers: Sequence,
    extract: Callable[[str], str | None] | None = None,
) -> float:
    """Fraction of predictions whose extracted answer equals the gold answer.

    predictions: generated texts; answers: gold answers (str or numbers), same length.
    extract: text -> answer or None (default `extract_final_answer`); both sides go through
    `normalize_answer`, so "12.0" matches 12. No extractable answer counts as wrong.
    Returns 0.0 for empty inputs.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    extract = extract or extract_final_answer
    hits = [
        (got := normalize_answer(extract(p))) is not None and got == normalize_answer(a)
        for p, a in zip(predictions, answers)
    ]
    return float(np.mean(hits)) if hits else 0.0


def preference_accuracy(policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None,
                        *, beta: float = 0.1) -> float:
    """Fraction of pairs whose implicit DPO reward beta * (policy - ref) is strictly larger for
    the chosen response than for the rejected one (TRL's `rewards/accuracies`).

    Each argument: [P] sequence log-probs (summed over completion tokens) per pair. Reference
    log-probs default to 0 (reference-free). Any beta > 0 gives the same answer; it is here
    so the definition reads as the reward it is. Ties count as wrong.
    """
    pc, pr = np.asarray(policy_chosen, np.float64), np.asarray(policy_rejected, np.float64)
    rc = np.zeros_like(pc) if ref_chosen is None else np.asarray(ref_chosen, np.float64)
    rr = np.zeros_like(pr) if ref_rejected is None else np.asarray(ref_rejected, np.float64)
    if not pc.shape == pr.shape == rc.shape == rr.shape:
        raise ValueError(f"log-prob shapes differ: {pc.shape}, {pr.shape}, {rc.shape}, {rr.shape}")
    if pc.size == 0:
        return 0.0
    return float(np.mean(beta * (pc - rc) > beta * (pr - rr)))
