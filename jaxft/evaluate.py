"""Generation-quality metrics for reports: exact-match accuracy, repetition ratio, preference
accuracy, and `evaluate_generation`, which runs greedy decoding over eval records.

Eval loss and the DPO reward metrics logged during training are computed by the train steps
(`jaxft/step_builders.py`, `jaxft/dpo_task.py`); nothing here duplicates them.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxft.generate import generate_text

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
    `jaxft.data.synthetic.extract_answer`), else the last number in the text, else None.
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


def _record_prompt(record: dict, index: int):
    """The prompt of an eval record: a message list without trailing assistant turns, or a string."""
    if "messages" in record:
        messages = list(record["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()  # a reference answer in the record is not part of the prompt
        prompt = messages
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        raise ValueError(f"record {index}: needs a 'messages' or 'prompt' field")
    if not prompt:
        raise ValueError(f"record {index}: the prompt is empty")
    if "answer" not in record:
        raise ValueError(f"record {index}: needs an 'answer' field")
    return prompt


def evaluate_generation(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    extract: Callable[[str], str | None] | None = None,
    num_samples: int = 3,
) -> dict:
    """Greedy-decodes each record's prompt and scores the outputs.

    records: `{"messages": [system?, user, (assistant)?], "answer": ...}` or
      `{"prompt": str | messages, "answer": ...}`. Message lists use the chat template with
      the generation prompt; plain string prompts are tokenized as they are.
    Returns {"exact_match", "repetition_ratio" (word 3-grams), "num_examples",
      "samples": the first `num_samples` as {"prompt", "output", "answer", "extracted"}}.
    """
    prompts = [_record_prompt(r, i) for i, r in enumerate(records)]
    answers = [r["answer"] for r in records]
    outputs = generate_text(model, tokenizer, prompts, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, temperature=0.0)
    extract = extract or extract_final_answer
    samples = [
        {"prompt": p, "output": o, "answer": a, "extracted": extract(o)}
        for p, o, a in list(zip(prompts, outputs, answers))[:num_samples]
    ]
    return {
        "exact_match": exact_match(outputs, answers, extract),
        "repetition_ratio": repetition_ratio(outputs),
        "num_examples": len(records),
        "samples": samples,
    }


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a JSONL file (blank lines skipped), at most `limit` of them."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if limit and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if "answer" not in records[-1]:
                raise ValueError(f"{path} line {line_no}: record has no 'answer' field")
    return records


def eval_loss(model, tokenizer, source: str, *, max_length: int = 512, batch_size: int = 16,
              limit: int | None = None) -> dict:
    """Token-mean loss and accuracy over the trained tokens of every record of `source`
    (any SFT format), exactly as `eval_loss` is computed during training."""
    import jax

    from jaxft import builders, sharding
    from jaxft.data.pipeline import make_eval_batches
    from jaxft.step_builders import sum_over_batches
    from jaxft.train_step import make_sft_eval_step

    mesh = sharding.make_mesh(data=-1)
    graphdef, params = builders.split_params(model)
    batches = make_eval_batches(source, tokenizer, kind="sft", batch_size=batch_size, max_length=max_length,
                                packing=False, process_index=jax.process_index(),
                                process_count=jax.process_count(), load_kwargs={"limit": limit})
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.replicated(mesh))
        totals = sum_over_batches(jax.jit(make_sft_eval_step(graphdef)), params, batches, mesh)
    n = max(totals.get("num_tokens", 0.0), 1.0)
    return {"eval_loss": totals["nll_sum"] / n, "eval_mean_token_accuracy": totals["num_correct"] / n}


def preference_eval(model, tokenizer, source: str, *, reference=None, beta: float = 0.1,
                    max_length: int = 512, batch_size: int = 16) -> dict:
    """Preference accuracy on held-out pairs: with a `reference` model, TRL's implicit-reward
    accuracy (beta * (log pi - log ref) of chosen > rejected); without, the share of pairs
    whose chosen answer has the higher per-token log-prob."""
    from jaxft.dpo_task import preference_logps

    pol = preference_logps(model, tokenizer, source, max_length=max_length, batch_size=batch_size)
    out = {"num_pairs": int(len(pol["chosen"]))}
    if reference is not None:
        ref = preference_logps(reference, tokenizer, source, max_length=max_length, batch_size=batch_size)
        out["reward_accuracy"] = preference_accuracy(pol["chosen"], pol["rejected"], ref["chosen"],
                                                     ref["rejected"], beta=beta)
    chosen = pol["chosen"] / np.maximum(pol["chosen_lengths"], 1)
    rejected = pol["rejected"] / np.maximum(pol["rejected_lengths"], 1)
    out["preference_accuracy"] = float(np.mean(chosen > rejected))
    return out


def _has_reference_answer(record: dict) -> bool:
    """Whether a record carries a full reference answer (not just the final number)."""
    messages = record.get("messages") or []
    return bool(record.get("completion") or record.get("text")
                or (messages and messages[-1].get("role") == "assistant"))


def eval_cli(model_dir: str, data_file: str | None = None, *, pairs_file: str | None = None,
             reference_dir: str | None = None, max_new_tokens: int = 128, limit: int | None = None,
             batch_size: int = 16, max_length: int = 512) -> dict:
    """`jaxft eval`: loads an HF folder (model + tokenizer); on `data_file` (JSONL with
    "answer" fields) reports eval loss, exact match, repetition ratio and samples; on
    `pairs_file` (preference data) the preference accuracy (against `reference_dir` too)."""
    import transformers

    from jaxft.models import load_hf

    if not data_file and not pairs_file:
        raise ValueError("jaxft eval needs --data (questions with answers) and/or --pairs (preference pairs)")
    model = load_hf(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = {}
    if data_file:
        records = read_jsonl(data_file, limit)
        out.update(evaluate_generation(model, tokenizer, records, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size))
        if all(_has_reference_answer(r) for r in records):  # else there is nothing to score a loss on
            out.update(eval_loss(model, tokenizer, data_file, max_length=max_length, batch_size=batch_size,
                                 limit=limit))
    if pairs_file:
        reference = load_hf(reference_dir) if reference_dir else None
        out.update(preference_eval(model, tokenizer, pairs_file, reference=reference, max_length=max_length,
                                   batch_size=batch_size))
    return out
