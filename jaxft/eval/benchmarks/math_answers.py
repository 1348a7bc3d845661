"""`math`: competition mathematics (MATH, Hendrycks et al. 2021; MATH-500), answers compared for
mathematical equivalence by `math-verify` (Hugging Face's maintained verifier: LaTeX and plain
expressions parsed to sympy, "\\frac{1}{2}" = "0.5" = "1/2", sets, intervals, matrices).

(Named math_answers so that nothing here can stand in for the standard library's `math`.)

Formats: MATH {"problem", "solution"} (the reference is the solution's last \\boxed{...}) and
MATH-500 {"problem", "answer", ...} (the reference is "answer"; a record with both uses
"answer"). A completion's answer is what math-verify extracts from it, a \\boxed{} first.
Prompts: chat asks the problem with "Please reason step by step, and put your final answer within
\\boxed{}." (default 0 examples); raw text is `--few-shot N` (default 4) worked examples as
"Problem:\\n...\\n\\nSolution:\\n... The final answer is $\\boxed{X}$." then the problem, the
format of Minerva's prompt; the examples are this project's own.
"""

from __future__ import annotations

from typing import Sequence

from jaxft.eval.benchmarks import register
from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark, Problem, Verdict
from jaxft.eval.benchmarks.gsm8k import build_prompt, few_shot_count, last_boxed

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STOP = ("Problem:", "\n\n\n")
FEW_SHOT = (0, 4)  # --few-shot's default with chat and with raw prompts

EXAMPLES = (
    ("Find the value of $x$ if $3x - 7 = 11$.", "Adding 7 to both sides gives $3x = 18$, so $x = 6$.", "6"),
    ("What is $\\frac{2}{3} + \\frac{1}{6}$?",
     "With the common denominator 6, $\\frac{4}{6} + \\frac{1}{6} = \\frac{5}{6}$.", "\\frac{5}{6}"),
    ("How many positive divisors does $36$ have?",
     "$36 = 2^2 \\cdot 3^2$, so it has $(2+1)(2+1) = 9$ positive divisors.", "9"),
    ("Solve for the positive root of $x^2 - 2 = 0$.", "$x^2 = 2$ gives $x = \\pm\\sqrt{2}$; the positive "
     "root is $\\sqrt{2}$.", "\\sqrt{2}"),
)


def reference_answer(record: dict, index: int) -> str:
    """A record's reference: "answer" (MATH-500), else the last \\boxed{} of "solution" (MATH);
    a DataError naming the record and field when neither gives one."""
    from jaxft.data.data_error import DataError

    where = record.get("_location", f"record {index}")
    answer = record.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    solution = record.get("solution")
    if not isinstance(solution, str):
        raise DataError(where, "needs an 'answer' or a 'solution' field (MATH records are {\"problem\", "
                        "\"solution\"}, MATH-500 records {\"problem\", \"answer\"})", field="answer")
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        raise DataError(where, "field 'solution' has no \\boxed{...} answer", field="solution")
    return boxed.strip()


def read_math(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    from jaxft.data.data_error import DataError

    shots = few_shot_count(settings, chat_default=FEW_SHOT[0], raw_default=FEW_SHOT[1], available=len(EXAMPLES))
    problems = []
    for i, record in enumerate(records):
        text = record.get("problem")
        if not isinstance(text, str) or not text.strip():
            raise DataError(record.get("_location", f"record {i}"), "field 'problem' is missing or empty",
                            field="problem")
        prompt = build_prompt(text, settings, EXAMPLES, instruction=INSTRUCTION, shots=shots, q="Problem:\n",
                              a="Solution:\n", final="The final answer is $\\boxed{{{}}}$.")
        problems.append(Problem(str(record.get("unique_id", record.get("id", i))), prompt,
                                reference_answer(record, i), record))
    return problems


def equivalent(reference: str, completion: str) -> Verdict:
    """Whether `completion`'s answer (math-verify's extraction, \\boxed{} first) equals
    `reference` (a LaTeX answer) for math-verify."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$")
    if not gold:  # not LaTeX math-verify reads: the boxed form
        gold = parse(f"\\boxed{{{reference}}}")
    got = parse(completion)
    extracted = last_boxed(completion)
    if extracted is None and got:
        extracted = str(got[-1])
    if not got:
        return Verdict(extracted, False, "no answer math-verify can read in the completion")
    if not gold:
        return Verdict(extracted, False, f"math-verify cannot read the reference {reference!r}")
    return Verdict(extracted, bool(verify(gold, got)))


def judge_math(problems: Sequence[Problem], completions: Sequence[Sequence[str]]) -> list[list[Verdict]]:
    return [[equivalent(p.reference, text) for text in texts] for p, texts in zip(problems, completions)]


MATH = register(GenerationBenchmark(
    name="math", description="MATH / MATH-500 competition problems: the \\boxed{} answer, equivalence by math-verify",
    read=read_math, judge=judge_math, default_data="HuggingFaceH4/MATH-500:test", stop=STOP,
    max_new_tokens=1024, chat=True, few_shot=FEW_SHOT))
