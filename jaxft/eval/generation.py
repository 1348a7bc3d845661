"""Greedy answers to eval records, scored: `evaluate_generation` and the records' reader."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from jaxft.errors import DataError, PathError
from jaxft.eval.metrics import exact_match, extract_final_answer, repetition_ratio
from jaxft.inference.generate import generate_text


def _record_prompt(record: dict, index: int):
    """The prompt of an eval record: a message list without trailing assistant turns, or a string."""
    prompt, problem = _prompt_of(record)
    if problem:
        raise DataError(f"record {index}: {problem}")
    return prompt


def _prompt_of(record, need_answer: bool = True) -> tuple[str | list | None, str | None]:
    """(the prompt of an eval record, None) or (None, what is wrong with the record)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return None, "'messages' must be a list of {\"role\", \"content\"} objects"
        messages = list(messages)
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()  # a reference answer in the record is not part of the prompt
        prompt = messages
        empty = not any(str(m.get("content") or "").strip() for m in messages)
    elif "prompt" in record:
        prompt = record["prompt"]
        empty = not (prompt.strip() if isinstance(prompt, str) else prompt)
    else:
        return None, "needs a 'messages' or 'prompt' field"
    if empty:
        return None, "the prompt is empty (nothing before the answer to generate from)"
    if need_answer and "answer" not in record:
        return None, "needs an 'answer' field"
    return prompt, None


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
    """Eval records of a data file, at most `limit` of them: JSONL (blank lines skipped), or any
    file, glob or folder that training reads (JSON, CSV, Parquet, .gz / .zst; `jaxft.data.sources`).
    Each needs a non-empty prompt ('prompt' or 'messages') and an 'answer'; a record that lacks
    them, or a line that is not JSON, is a ValueError naming the file and its 1-based line."""
    return [record for record, _ in _read_records(path, limit, need_answer=True)]


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """The prompts of a data file (read as `read_jsonl` reads it) of records with a 'prompt' (a
    string or messages) or 'messages' (trailing assistant turns dropped); an eval data file works.
    An empty prompt is a ValueError naming the file and its 1-based line."""
    return [prompt for _, prompt in _read_records(path, None, need_answer=False)]


def check_local_source(path: str | Path, flag: str = "") -> str:
    """`path` as a source that `read_records` reads from this disk (a file, a folder of data
    files, a glob), or a FileNotFoundError naming it (and `flag`): eval and prompt files are
    never looked up on the Hugging Face hub."""
    path = str(path)
    if not (Path(path).expanduser().exists() or any(c in path for c in "*?[")):
        raise PathError(f"{flag + ' ' if flag else ''}{path}: the file does not exist")
    return path


def _read_records(path, limit, *, need_answer: bool) -> list[tuple[dict, str | list]]:
    from jaxft.data.data_error import DataError
    from jaxft.data.sources import read_records

    out = []
    for location, record in read_records(check_local_source(path)):
        if limit and len(out) >= limit:
            break
        if isinstance(record, DataError):  # not JSON, not UTF-8: names the file and line
            raise record
        prompt, problem = _prompt_of(record, need_answer)
        if problem:
            raise DataError(location, problem)
        out.append((record, prompt))
    if not out:
        raise DataError(str(path), "no records (an empty file?)")
    return out
