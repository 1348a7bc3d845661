"""`mbpp`: short Python tasks described in one sentence, scored by running their three asserts on
the completion (Austin et al. 2021, "Program Synthesis with Large Language Models").

Public format (google-research-datasets/mbpp, "full"): {"task_id", "text", "code", "test_list",
"test_setup_code", "challenge_test_list"}; the "sanitized" config's "prompt" is read as "text".
The full set lives on the hub (`--data google-research-datasets/mbpp:full:test`); the default is
a six-record sample in that format, the project's own (jaxft/assets/benchmarks/mbpp_sample.jsonl),
enough to check the scoring, not to measure a model.

Prompt: the paper's, which lm-eval and DeepSeek-Coder use: "You are an expert Python programmer,
and here is your task: {text} Your code should pass these tests:\\n\\n{test_list}\\n". Raw text
(the default) follows it with "[BEGIN]\\n", after `--few-shot N` (default 3) worked examples
ending "[DONE]", and the completion is cut at "[DONE]"; chat (`--chat`) asks for the code in a
```python block (few-shot default 0) and runs the first block. The program run is
test_setup_code + the code + the asserts of test_list (challenge_test_list is not run, as in the
paper's results), in `jaxft.eval.sandbox` with a 10 s wall clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jaxft.eval.benchmarks import register
from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark, Problem, Verdict
from jaxft.eval.benchmarks.humaneval import extract_code, judge_programs, read_fields

SAMPLE = Path(__file__).resolve().parent.parent.parent / "assets" / "benchmarks" / "mbpp_sample.jsonl"
STOP = ("[DONE]",)
CHAT_INSTRUCTION = "Answer with the Python code in one ```python code block."

# (text, code, tests): worked examples for the few-shot prompt in MBPP's style, the project's own
# (the paper's shots are MBPP's task ids 2-4, from its prompt split).
EXAMPLES = (
    ("Write a function to find the largest of three numbers.",
     "def largest_of_three(a, b, c):\n    return max(a, b, c)",
     ["assert largest_of_three(1, 5, 3) == 5", "assert largest_of_three(-1, -5, -3) == -1",
      "assert largest_of_three(7, 7, 2) == 7"]),
    ("Write a python function to count the vowels in a string.",
     "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")",
     ["assert count_vowels(\"Hello\") == 2", "assert count_vowels(\"xyz\") == 0",
      "assert count_vowels(\"AEIOU\") == 5"]),
    ("Write a function to remove the duplicates from a list, keeping the first occurrence of each item.",
     "def dedupe(items):\n    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n"
     "            seen.add(x)\n            out.append(x)\n    return out",
     ["assert dedupe([1, 2, 1, 3, 2]) == [1, 2, 3]", "assert dedupe([]) == []",
      "assert dedupe([\"a\", \"a\"]) == [\"a\"]"]),
)


def task_text(text: str, tests: Sequence[str]) -> str:
    """The paper's prompt for one task (without "[BEGIN]")."""
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass "
            "these tests:\n\n" + "\n".join(tests) + "\n")


def read_mbpp(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    from jaxft.data.data_error import DataError
    from jaxft.eval.benchmarks.gsm8k import few_shot_count

    shots = few_shot_count(settings, chat_default=0, raw_default=3, available=len(EXAMPLES))
    problems = []
    for i, record in enumerate(records):
        if "text" not in record and "prompt" in record:  # the "sanitized" config
            record = {**record, "text": record["prompt"]}
        read_fields(record, ("text",), "MBPP", '{"task_id", "text", "code", "test_list", "test_setup_code", ...}')
        tests = record.get("test_list")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise DataError(record.get("_location", f"record {i}"), "field 'test_list' must be a non-empty list "
                            "of assert statements (strings)", field="test_list")
        setup = record.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise DataError(record.get("_location", f"record {i}"), "field 'test_setup_code' must be a string",
                            field="test_setup_code")
        if settings.chat:
            prompt = []
            for text, code, ex_tests in EXAMPLES[:shots]:
                prompt += [{"role": "user", "content": task_text(text, ex_tests) + CHAT_INSTRUCTION},
                           {"role": "assistant", "content": f"```python\n{code}\n```"}]
            prompt.append({"role": "user", "content": task_text(record["text"], tests) + CHAT_INSTRUCTION})
        else:
            prompt = "".join(f"{task_text(text, ex_tests)}[BEGIN]\n{code}\n[DONE]\n\n"
                             for text, code, ex_tests in EXAMPLES[:shots])
            prompt += task_text(record["text"], tests) + "[BEGIN]\n"
        problems.append(Problem(str(record.get("task_id", i)), prompt, {"tests": tests, "setup": setup}, record))
    return problems


def program(problem: Problem, completion: str) -> tuple[str, str]:
    """(the code taken from the completion, test_setup_code + code + the asserts)."""
    if isinstance(problem.prompt, str):
        code = completion.split(STOP[0], 1)[0]
        code = extract_code(code) if "```" in code else code  # a raw completion that fenced its code
    else:
        code = extract_code(completion)
    ref = problem.reference
    return code, "\n".join([ref["setup"], code, *ref["tests"]]) + "\n"


def judge_mbpp(problems: Sequence[Problem], completions: Sequence[Sequence[str]]) -> list[list[Verdict]]:
    return judge_programs(problems, completions, program)


MBPP = register(GenerationBenchmark(
    name="mbpp", description="MBPP: short Python tasks, pass@k of their asserts run in a sandbox",
    read=read_mbpp, judge=judge_mbpp, default_data=str(SAMPLE), stop=STOP, max_new_tokens=512, chat=False))
