"""Greedy answers to eval records, scored: `evaluate_generation` and the records' reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from jaxft.eval.metrics import exact_match, extract_final_answer, repetition_ratio
from jaxft.inference.generate import generate_text


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
