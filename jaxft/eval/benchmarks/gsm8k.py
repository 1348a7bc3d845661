"""`gsm8k`: grade-school word problems, scored on the final number (Cobbe et al. 2021).

Public format (openai/gsm8k, config "main"): {"question": str, "answer": str}, the answer a
worked solution ending "#### 72". The reference is the number after "####" (thousands commas
dropped). A completion's answer is, in this order: the last \\boxed{...}, a "#### N", the number
after the first "The answer is" (a model that goes on after committing keeps its verdict), else
its last number; both sides go through `jaxft.eval.metrics.normalize_answer` ("1,000.00" ->
"1000").

Prompts: raw text ("--no-chat", the base-model setting of lm-eval's gsm8k_cot and of DeepSeek's
base-model tables) is `--few-shot N` (default 8) worked examples as "Question: ...\\nAnswer: ...
The answer is N." followed by the question; chat (the default where the tokenizer has a
template) asks the question in one user turn with an instruction to end on "The answer is N"
(`--few-shot N` puts N examples before it as earlier turns; default 0). The eight examples are
this project's own, written in GSM8K's style.

`arithmetic` is the same scoring on jaxft's own eval records ({"messages" | "prompt", "answer"}:
the quickstart's held-out questions), with the repetition ratio of the same completions, so the
quickstart reports through this code; its default data is the shipped quickstart eval set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from jaxft.errors import ConfigError
from jaxft.eval.benchmarks import register
from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark, Problem, Verdict
from jaxft.eval.metrics import _ANSWER_IS_RE, _NUMBER_RE, normalize_answer, repetition_ratio

INSTRUCTION = 'Solve the problem step by step, then end with "The answer is N." where N is the final number.'
STOP = ("Question:", "\n\n\n")  # the next few-shot question; a run of blank lines
FEW_SHOT = (0, 8)  # --few-shot's default with chat and with raw prompts

# (question, worked answer, final number): eight examples in GSM8K's style, the project's own.
EXAMPLES = (
    ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. How many "
     "muffins are left?", "She makes 24 + 18 = 42 muffins. After selling 30, 42 - 30 = 12 are left.", "12"),
    ("Leo reads 15 pages a day. How many pages does he read in 2 weeks?",
     "2 weeks are 2 * 7 = 14 days. He reads 15 * 14 = 210 pages.", "210"),
    ("A box holds 6 pencils. A teacher needs 75 pencils. How many boxes must she buy?",
     "75 / 6 = 12.5, so 12 boxes are not enough. She must buy 13 boxes.", "13"),
    ("Maria had $50. She bought 3 books for $8 each and a pen for $2. How much money does she have left?",
     "The books cost 3 * 8 = $24. With the pen she spent 24 + 2 = $26. She has 50 - 26 = $24 left.", "24"),
    ("A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How far does "
     "it travel?", "First 60 * 3 = 180 miles, then 40 * 2 = 80 miles. In all 180 + 80 = 260 miles.", "260"),
    ("There are 32 students in a class. A quarter of them walk to school and the rest take the bus. How "
     "many take the bus?", "A quarter of 32 is 32 / 4 = 8 students who walk. So 32 - 8 = 24 take the bus.",
     "24"),
    ("Sam is 4 years older than Ana. Ana is twice as old as Ben, who is 5. How old is Sam?",
     "Ana is 2 * 5 = 10. Sam is 10 + 4 = 14.", "14"),
    ("A shirt costs $20 and is on sale for 25% off. How much does it cost on sale?",
     "25% of 20 is 0.25 * 20 = $5. The sale price is 20 - 5 = $15.", "15"),
)


def extract_number(text: str) -> str | None:
    """The final number a completion commits to (see the module docstring), normalised; None
    when it holds no number."""
    boxed = last_boxed(text)
    if boxed is not None:
        numbers = _NUMBER_RE.findall(boxed)
        return normalize_answer(numbers[-1]) if numbers else normalize_answer(boxed)
    hashes = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if hashes:
        return normalize_answer(hashes.group(1))
    match = _ANSWER_IS_RE.search(text)
    if match:
        return normalize_answer(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None
    when there is none or it is not closed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def reference_number(answer: str) -> str | None:
    """The number after "####" in a GSM8K answer ("... #### 1,200" -> "1200"), or None."""
    head, sep, tail = str(answer).rpartition("####")
    return normalize_answer(tail.strip()) if sep and tail.strip() else None


def _field(record: dict, name: str) -> str:
    from jaxft.data.data_error import DataError

    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if value is None else "must be a non-empty string"
        raise DataError(record.get("_location", "record"), f"field '{name}' {problem} (GSM8K records are "
                        '{"question": ..., "answer": "... #### N"})', field=name)
    return value


def few_shot_count(settings: EvalSettings, *, chat_default: int, raw_default: int, available: int) -> int:
    """--few-shot, else the default for chat / raw prompts; more than `available` is a ConfigError."""
    n = settings.few_shot if settings.few_shot is not None else (chat_default if settings.chat else raw_default)
    if not 0 <= n <= available:
        raise ConfigError(f"--few-shot {n}: this benchmark has {available} worked examples (0..{available})")
    return n


def build_prompt(question: str, settings: EvalSettings, examples: Sequence[tuple[str, str, str]], *,
                 instruction: str, shots: int, q: str = "Question: ", a: str = "Answer: ",
                 final: str = "The answer is {}."):
    """A chat message list (instruction with the question; `shots` examples as earlier turns) or
    raw few-shot text ("Question: ...\\nAnswer: ... The answer is N.\\n\\n" each, then the question)."""
    shown = examples[:shots]
    if settings.chat:
        messages = []
        for ex_q, ex_a, ex_n in shown:
            messages += [{"role": "user", "content": f"{ex_q}\n{instruction}"},
                         {"role": "assistant", "content": f"{ex_a} {final.format(ex_n)}"}]
        return messages + [{"role": "user", "content": f"{question}\n{instruction}"}]
    blocks = [f"{q}{ex_q}\n{a}{ex_a} {final.format(ex_n)}\n\n" for ex_q, ex_a, ex_n in shown]
    return "".join(blocks) + f"{q}{question}\n{a.rstrip()}"


def read_gsm8k(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    from jaxft.data.data_error import DataError

    shots = few_shot_count(settings, chat_default=FEW_SHOT[0], raw_default=FEW_SHOT[1], available=len(EXAMPLES))
    problems = []
    for i, record in enumerate(records):
        question, answer = _field(record, "question"), _field(record, "answer")
        reference = reference_number(answer)
        if reference is None:
            raise DataError(record.get("_location", f"record {i}"), "field 'answer' has no final '#### N' "
                            "(GSM8K answers end with '#### ' and the number)", field="answer")
        prompt = build_prompt(question, settings, EXAMPLES, instruction=INSTRUCTION, shots=shots)
        problems.append(Problem(str(record.get("id", i)), prompt, reference, record))
    return problems


def judge_numbers(problems: Sequence[Problem], completions: Sequence[Sequence[str]]) -> list[list[Verdict]]:
    """Each completion's final number (`extract_number`) against the problem's reference."""
    out = []
    for problem, texts in zip(problems, completions):
        verdicts = []
        for text in texts:
            got = extract_number(text)
            verdicts.append(Verdict(got, got is not None and got == normalize_answer(problem.reference),
                                    None if got is not None else "no number in the completion"))
        out.append(verdicts)
    return out


def read_arithmetic(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    """jaxft's eval records: the prompt ('messages' without trailing assistant turns, or
    'prompt') as it is, the reference its 'answer'."""
    from jaxft.data.data_error import DataError
    from jaxft.eval.generation import _prompt_of

    problems = []
    for i, record in enumerate(records):
        prompt, problem = _prompt_of({k: v for k, v in record.items() if k != "_location"})
        if problem:
            raise DataError(record.get("_location", f"record {i}"), problem)
        if not isinstance(prompt, str) and not settings.chat:
            raise DataError(record.get("_location", f"record {i}"), "a message list needs the chat template "
                            "(--chat); give string 'prompt' fields for --no-chat")
        problems.append(Problem(str(record.get("id", i)), prompt, str(record["answer"]), record))
    return problems


GSM8K = register(GenerationBenchmark(
    name="gsm8k", description="GSM8K grade-school math: the final number (#### N) of the answer",
    read=read_gsm8k, judge=judge_numbers, default_data="openai/gsm8k:main:test", stop=STOP,
    max_new_tokens=512, chat=True, few_shot=FEW_SHOT))

_QUICKSTART_EVAL = str(Path(__file__).resolve().parents[2] / "assets" / "quickstart" / "sft_eval.jsonl")


def _repetition(problems, completions, sampled) -> dict[str, float]:
    return {"repetition_ratio": repetition_ratio([t for texts in completions for t in texts])}


ARITHMETIC = register(GenerationBenchmark(
    name="arithmetic", description="jaxft eval records ({'messages' | 'prompt', 'answer'}) scored like GSM8K, "
    "with the repetition ratio: the quickstart's held-out questions", read=read_arithmetic, judge=judge_numbers,
    default_data=_QUICKSTART_EVAL, max_new_tokens=64, chat=True, metrics=_repetition))
