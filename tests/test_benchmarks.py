"""Generation benchmarks (issue 26): scoring on the shipped GSM8K / MATH / MATH-500 format samples,
the runner's pass@k over judged samples, the real sampler end to end on a tiny model, the
`jaxft eval --benchmark` outputs (--json, --samples-out), clear errors, and benchmarks during
training landing in metrics.jsonl."""

import dataclasses
import json

import pytest

from jaxft import cli
from jaxft.errors import ConfigError, DataError
from jaxft.eval.benchmarks import get_benchmark
from jaxft.eval.benchmarks.base import EvalSettings, pass_at_k
from jaxft.eval.benchmarks.gsm8k import extract_number, reference_number
from jaxft.eval.benchmarks.runner import (
    pass_at_k_metrics, pass_at_ks, parse_hub_name, prepare, read_benchmark_records, run_generation_benchmark,
)
from jaxft.inference.completions import Completion

SAMPLES = "jaxft/assets/benchmarks"
GSM8K = f"{SAMPLES}/gsm8k_sample.jsonl"
MATH = f"{SAMPLES}/math_sample.jsonl"
MATH500 = f"{SAMPLES}/math500_sample.jsonl"


def problems(name, path, **settings):
    records, _ = read_benchmark_records(path)
    bench = get_benchmark(name)
    return bench, bench.read(records, EvalSettings(**{"chat": True, **settings}))


# --- scoring on the shipped samples, in the benchmarks' public formats ---------------------------


def test_gsm8k_references_are_the_numbers_after_the_hashes():
    _, ps = problems("gsm8k", GSM8K)
    assert [p.reference for p in ps] == ["26", "1000", "16.5", "2", "-7"]  # "#### 1,000" loses its comma
    assert reference_number("3 + 4 = 7 #### 7.0") == "7" and reference_number("7") is None


@pytest.mark.parametrize("text, expected", [
    ("3 * 12 = 36 and 36 - 10 = 26. The answer is 26.", "26"),
    ("The answer is 26. The answer is 27.", "26"),  # the first commitment counts, not a repeat
    ("so we get \\boxed{26} apples, not 30", "26"),  # boxed wins over the last number
    ("work ... #### 1,000", "1000"),
    ("It is $1,000.00 in all", "1000"),
    ("it drops to -7 degrees", "-7"),
    ("no idea", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_number(text) == expected


def test_gsm8k_a_right_completion_scores_one_and_a_wrong_one_zero():
    bench, ps = problems("gsm8k", GSM8K)
    verdicts = bench.judge(ps, [["36 - 10 = 26. The answer is 26."] * 1 + ["The answer is 25."]] +
                           [["\\boxed{1,000}", "999"]] + [["16.50", "16"]] + [["2", "8"]] + [["-7", "7"]])
    assert [[v.correct for v in vs] for vs in verdicts] == [[True, False]] * 5
    assert verdicts[0][1].extracted == "25"


def test_gsm8k_prompts_raw_few_shot_and_chat():
    _, raw = problems("gsm8k", GSM8K, chat=False)
    assert raw[0].prompt.count("Question: ") == 9 and raw[0].prompt.endswith("her brother. How many stickers "
                                                                              "does she have left?\nAnswer:")
    _, raw2 = problems("gsm8k", GSM8K, chat=False, few_shot=2)
    assert raw2[0].prompt.count("The answer is") == 2
    _, chat = problems("gsm8k", GSM8K, few_shot=1)
    assert [m["role"] for m in chat[0].prompt] == ["user", "assistant", "user"]
    with pytest.raises(ConfigError, match="--few-shot 9"):
        problems("gsm8k", GSM8K, few_shot=9)


def test_math_references_from_boxed_solutions_and_answers():
    _, ps = problems("math", MATH)
    assert [p.reference for p in ps] == ["\\frac{2}{3}", "2, 3", "9\\pi", "5\\sqrt{2}"]
    _, ps500 = problems("math", MATH500)
    assert [p.reference for p in ps500] == ["5", "\\frac{1}{4}", "15"]
    assert ps500[0].id == "sample/algebra/1.json"


def test_math_equivalence_by_math_verify():
    bench, ps = problems("math", MATH)
    completions = [["so it is $\\boxed{\\frac{4}{6}}$", "\\boxed{0.6}"],  # 4/6 = 2/3; 0.6 is not
                   ["\\boxed{3, 2}", "\\boxed{2}"],
                   ["The area is \\boxed{9\\pi}.", "\\boxed{6\\pi}"],
                   ["\\boxed{\\sqrt{50}}", "no answer here"]]
    verdicts = bench.judge(ps, completions)
    assert [[v.correct for v in vs] for vs in verdicts] == [[True, False]] * 4
    assert verdicts[0][0].extracted == "\\frac{4}{6}"
    assert verdicts[3][1].error and not verdicts[3][1].correct


def test_a_record_missing_a_field_names_the_file_line_and_field(tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a #### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k.jsonl line 2: field 'answer' is missing"):
        problems("gsm8k", str(bad))
    bad.write_text(json.dumps({"question": "q", "answer": "no hashes"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'answer' has no final '#### N'"):
        problems("gsm8k", str(bad))
    bad.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'solution' has no \\boxed"):
        problems("math", str(bad))


def test_hub_names():
    assert parse_hub_name("openai/gsm8k:main:test") == ("openai/gsm8k", "main", "test")
    assert parse_hub_name("HuggingFaceH4/MATH-500") == ("HuggingFaceH4/MATH-500", None, "test")
    assert parse_hub_name("openai/gsm8k:train") == ("openai/gsm8k", None, "train")
    assert parse_hub_name("openai/gsm8k:main") == ("openai/gsm8k", "main", "test")


def test_a_hub_name_loads_its_config_and_split(monkeypatch):
    """--data NAME:CONFIG:SPLIT reaches datasets.load_dataset as such (no download here: the
    loader is replaced by an in-memory dataset), --limit taken before the records are read."""
    import datasets

    asked = []

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records, display = read_benchmark_records("openai/gsm8k:main:test", limit=3)
    assert asked == [("openai/gsm8k", "main", "test")] and display == "openai/gsm8k[main:test]"
    assert [r["question"] for r in records] == ["q0", "q1", "q2"]
    assert records[2]["_location"] == "openai/gsm8k[main:test] index 2"


# --- pass@k --------------------------------------------------------------------------------------


def test_pass_at_k_reported_for_one_powers_of_two_and_samples():
    assert pass_at_ks(1) == [1] and pass_at_ks(4) == [1, 2, 4] and pass_at_ks(10) == [1, 2, 4, 8, 10]
    # Two problems, 4 samples: 1 right of 4 and 4 right of 4. By hand: pass@1 = (1/4 + 1) / 2;
    # pass@2 = (1 - C(3,2)/C(4,2) + 1) / 2 = (1/2 + 1) / 2; pass@4 = 1.
    got = pass_at_k_metrics([[True, False, False, False], [True] * 4], 4)
    assert got == pytest.approx({"pass@1": 0.625, "pass@2": 0.75, "pass@4": 1.0})
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))


# --- the runner ----------------------------------------------------------------------------------


class Tok:
    """Only what the runner asks a tokenizer when the sampler is a stand-in: its chat template."""
    chat_template = "{{ messages }}"


def test_runner_judges_samples_and_writes_every_field(tmp_path):
    """The judge path with the model's output fixed (a stand-in sampler): pass@k from verdicts,
    stop strings cut raw completions only, one samples row per completion."""
    answers = {"Nina": ["The answer is 26.", "25\n\nQuestion: next"], "farm": ["1,000", "The answer is 1000"]}
    calls = {}

    def sampler(model, tokenizer, prompts, **kw):
        calls.update(kw)
        out = []
        for p in prompts:
            question = p.rsplit("Question: ", 1)[-1] if isinstance(p, str) else p[-1]["content"]
            texts = next(v for k, v in answers.items() if k in question)
            out.append([Completion(t, [1, 2], "stop" if "Question" in t else "eos") for t in texts])
        return out

    settings = EvalSettings(data=GSM8K, limit=2, samples=2, temperature=0.8, top_k=40)
    result = run_generation_benchmark(get_benchmark("gsm8k"), None, Tok(), settings, sample_fn=sampler)
    assert calls["samples"] == 2 and calls["stop"] == () and calls["max_new_tokens"] == 512  # chat: EOS ends
    assert calls["top_k"] == 40 and result.summary()["settings"]["top_k"] == 40
    assert result.n == 2 and result.metrics == pytest.approx({"pass@1": 0.75, "pass@2": 1.0, "truncated": 0.0})
    rows = result.samples
    assert len(rows) == 4 and rows[1]["completion"] == "25\n\nQuestion: next" and rows[1]["correct"] is False
    assert set(rows[0]) >= {"prompt", "completion", "extracted", "reference", "correct", "error", "problem", "sample"}
    assert result.summary()["settings"]["chat"] is True and result.summary()["settings"]["few_shot"] == 0
    raw = run_generation_benchmark(get_benchmark("gsm8k"), None, Tok(), dataclasses.replace(settings, chat=False),
                                   sample_fn=sampler)
    assert calls["stop"] == ("Question:", "\n\n\n") and raw.samples[1]["completion"] == "25\n\n"
    assert raw.settings["few_shot"] == 8 and raw.samples[0]["prompt"].count("Question: ") == 9  # as reported


def test_samples_above_one_at_temperature_zero_is_refused():
    with pytest.raises(ConfigError, match="--samples 4 with --temperature 0"):
        prepare(get_benchmark("gsm8k"), Tok(), EvalSettings(data=GSM8K, samples=4))


def test_lm_eval_generation_overrides_only_what_was_set():
    from jaxft.eval.benchmarks.lm_harness import gen_kwargs

    assert gen_kwargs(EvalSettings()) is None
    assert gen_kwargs(EvalSettings(temperature=0.7, top_p=0.9, top_k=20)) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'gsm9k': no such benchmark; known: .*gsm8k.*math.*repetition"):
        get_benchmark("gsm9k")


def test_repetition_reports_the_ratio_not_pass_at_k():
    def sampler(model, tokenizer, prompts, **kw):
        return [[Completion("a b a b a b", [], "length")], [Completion("a b c d", [], "eos")]][:len(prompts)]

    result = run_generation_benchmark(get_benchmark("repetition"), None, Tok(),
                                      EvalSettings(data=GSM8K, limit=2), sample_fn=sampler)
    assert result.metrics == pytest.approx({"repetition_ratio": 0.25, "truncated": 0.5})  # (0.5 + 0) / 2


# --- on a tiny model, with the real sampler ------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.quickstart_subset import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("model"))


def test_eval_cli_writes_json_and_samples(model_dir, tmp_path, capsys):
    """`jaxft eval --benchmark` on a random tiny model with the real sampler: the --json summary
    and --samples-out rows, whose verdicts agree with the judge on their own completions."""
    out, samples = tmp_path / "out.json", tmp_path / "samples.jsonl"
    cli.main(["eval", "--model", str(model_dir), "--benchmark", "gsm8k", "--data", GSM8K, "--limit", "3",
              "--max-new-tokens", "8", "--samples", "2", "--temperature", "1.0", "--top-k", "5", "--no-chat",
              "--few-shot", "1", "--json", str(out), "--samples-out", str(samples), "--no-progress"])
    summary = json.loads(out.read_text())
    assert summary["benchmark"] == "gsm8k" and summary["n"] == 3 and summary["model"] == str(model_dir)
    assert set(summary["metrics"]) == {"pass@1", "pass@2", "truncated"}
    assert summary["settings"]["chat"] is False and summary["settings"]["samples"] == 2
    assert summary["settings"]["top_k"] == 5
    assert json.loads(capsys.readouterr().out) == summary
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["problem"], r["sample"]) for r in rows] == [(str(i), j) for i in range(3) for j in range(2)]
    assert all(r["prompt"].startswith("Question: ") and r["reference"] for r in rows)
    for r in rows:
        assert r["extracted"] == extract_number(r["completion"])
        assert r["correct"] == (r["extracted"] == r["reference"])
    correct = [sum(r["correct"] for r in rows if r["problem"] == str(i)) for i in range(3)]
    assert summary["metrics"]["pass@1"] == pytest.approx(sum(c / 2 for c in correct) / 3)


def test_runner_with_the_real_sampler_is_deterministic_for_a_seed(model_dir):
    from jaxft.inference.generate import load_folder

    model, tok = load_folder(str(model_dir))
    settings = EvalSettings(data="jaxft/assets/quickstart/sft_eval.jsonl", limit=4, max_new_tokens=8)
    first = run_generation_benchmark(get_benchmark("arithmetic"), model, tok, settings)
    again = run_generation_benchmark(get_benchmark("arithmetic"), model, tok, dataclasses.replace(settings))
    assert [r["completion"] for r in first.samples] == [r["completion"] for r in again.samples]
    assert first.metrics["pass@1"] == sum(r["correct"] for r in first.samples) / 4


def test_eval_cli_errors(model_dir, capsys):
    with pytest.raises(SystemExit, match="no such benchmark; known: arithmetic"):
        cli.main(["eval", "--model", str(model_dir), "--benchmark", "gsm9k"])
    with pytest.raises(SystemExit, match="--samples 3 with --temperature 0"):
        cli.main(["eval", "--model", str(model_dir), "--benchmark", "gsm8k", "--data", GSM8K, "--samples", "3"])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(model_dir), "--data", GSM8K, "--samples", "3"])
    assert "--samples goes with --benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(model_dir), "--data", GSM8K, "--top-k", "5"])
    assert "--top-k goes with --benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--top-k must be >= 0"):
        cli.main(["eval", "--model", str(model_dir), "--benchmark", "gsm8k", "--data", GSM8K, "--top-k", "-1"])


# --- during training -----------------------------------------------------------------------------


def test_training_logs_benchmark_metrics(tmp_path):
    """train.eval_benchmarks: scored at every train.eval_every step and at the end, one
    eval/NAME/METRIC column each in metrics.jsonl, the completions kept per evaluation."""
    from jaxft import config as config_lib, run as run_lib
    from jaxft.io.metrics import read_metrics
    from tests.quickstart_subset import sft_data

    data = sft_data(tmp_path, 32, 4)
    overrides = {"data.train": data["data.train"], "train.steps": 3, "train.batch_size": 8, "data.max_length": 64,
                 "train.progress": False, "train.log_every": 1, "train.save_every": 3, "train.eval_every": 2,
                 "optim.warmup_steps": 1, "mesh.data": -1, "train.report_to": "none",
                 "train.eval_benchmarks": f"arithmetic={data['data.eval']},gsm8k={GSM8K}",
                 "train.eval_benchmark_limit": 2, "train.eval_benchmark_max_new_tokens": 4}
    run_lib.run(config_lib.load("configs/sft.py:tiny", overrides), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "eval/gsm8k/pass@1" in r]
    assert [r["step"] for r in rows] == [2, 3]  # every 2 steps and at the end
    assert all(0 <= r["eval/arithmetic/pass@1"] <= 1 and "eval/arithmetic/truncated" in r for r in rows)
    assert all("loss" in r for r in rows)  # the step's one row
    folder = tmp_path / "run" / "benchmarks" / "gsm8k"
    assert sorted(p.name for p in folder.iterdir()) == ["step_2.jsonl", "step_3.jsonl"]
    assert len((folder / "step_3.jsonl").read_text().splitlines()) == 2


def test_an_unknown_training_benchmark_fails_at_start_up(tmp_path):
    from jaxft import config as config_lib, run as run_lib
    from tests.quickstart_subset import sft_data

    overrides = {**sft_data(tmp_path, 16, 4), "train.steps": 2, "train.eval_benchmarks": "gsm8k,nope"}
    with pytest.raises(ConfigError, match=r"train.eval_benchmarks: 'nope': no such benchmark"):
        run_lib.run(config_lib.load("configs/sft.py:tiny", overrides), tmp_path / "run")


def test_compare_shows_logged_and_scored_benchmark_columns(model_dir, tmp_path, capsys):
    """`jaxft compare`: benchmarks logged during training are columns as they are; --benchmark
    scores each run's export now."""
    import shutil

    runs = []
    for name, logged in (("a", 0.25), ("b", 0.5)):
        run = tmp_path / name
        shutil.copytree(model_dir, run / "hf")
        rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval/gsm8k/pass@1": logged}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    cli.main(["compare", *runs, "--benchmark", f"gsm8k={GSM8K}", "--limit", "2", "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "eval/gsm8k/pass@1" in header and "gsm8k/pass@1" in header.replace("eval/gsm8k/pass@1", "")
    line_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert "0.25" in line_a
    with pytest.raises(SystemExit, match="--benchmark: 'gsm9k': no such benchmark"):
        cli.main(["compare", *runs, "--benchmark", "gsm9k"])
