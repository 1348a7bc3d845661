"""The quickstart's generated data: deterministic, held-out eval, checkable answers, the
configured share of repetitive SFT answers, and well-formed preference pairs."""

import json
import re

import pytest

from jaxft.quickstart.data import (
    SPLITS, extract_answer, make_quickstart_data, tokenizer_training_text, write_quickstart_data,
)

SIZES = dict(num_sft=600, num_pref=300, num_eval=80)
_EQUATION = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)\.")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _problem(answer_text: str) -> tuple:
    """(op, a, b) of a worked answer, asserting its equation is arithmetically right."""
    match = _EQUATION.match(answer_text)
    assert match, answer_text
    a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
    return op, a, b, result


def _user(messages) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def _prompt_and_answer(record) -> tuple[list, str]:
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1]["content"]
    return record["prompt"], record["chosen"][0]["content"]


def _is_repetitive(text: str) -> bool:
    return text.count("The answer is") > 1


@pytest.fixture(scope="module")
def data():
    return make_quickstart_data(seed=0, **SIZES)


@pytest.fixture(scope="module", params=["wording", "problem"])
def any_split(request):
    return request.param, make_quickstart_data(seed=1, eval_split=request.param, **SIZES)


def test_deterministic_for_a_seed():
    first = make_quickstart_data(seed=7, **SIZES)
    assert first == make_quickstart_data(seed=7, **SIZES)
    assert first != make_quickstart_data(seed=8, **SIZES)


def test_sizes_and_record_formats(data):
    assert set(data) == set(SPLITS)
    sizes = {"sft_train": SIZES["num_sft"], "pref_train": SIZES["num_pref"],
             "sft_eval": SIZES["num_eval"], "pref_eval": SIZES["num_eval"]}
    for split, records in data.items():
        assert len(records) == sizes[split], split
    for record in data["sft_train"] + data["sft_eval"]:
        roles = [m["role"] for m in record["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert set(record) == {"messages", "answer"}
    for record in data["pref_train"] + data["pref_eval"]:
        assert [m["role"] for m in record["prompt"]][-1] == "user"
        assert [m["role"] for m in record["chosen"]] == [m["role"] for m in record["rejected"]] == ["assistant"]
        assert set(record) == {"prompt", "chosen", "rejected", "answer"}
        assert all(isinstance(m["content"], str) and m["content"] for k in ("prompt", "chosen", "rejected")
                   for m in record[k])


def test_eval_questions_never_appear_in_training(any_split):
    mode, data = any_split
    train = [_prompt_and_answer(r) for r in data["sft_train"] + data["pref_train"]]
    held_out = [_prompt_and_answer(r) for r in data["sft_eval"] + data["pref_eval"]]
    assert {_user(p) for p, _ in train}.isdisjoint(_user(p) for p, _ in held_out)
    if mode == "problem":
        # Whole (op, a, b) problems are held out, not just their wording.
        train_problems = {_problem(a)[:3] for _, a in train}
        assert train_problems.isdisjoint(_problem(a)[:3] for _, a in held_out)


def test_gold_answers_are_correct_and_extractable(any_split):
    _, data = any_split
    for split, records in data.items():
        for record in records:
            _, text = _prompt_and_answer(record)
            op, a, b, result = _problem(text)
            assert result == _OPS[op](a, b) >= 0
            assert record["answer"] == str(result)
            assert extract_answer(text) == record["answer"], (split, text)


def test_extract_answer():
    assert extract_answer("7 + 5 = 12. The answer is 12.") == "12"
    assert extract_answer("The answer is 12. The answer is 12. The answer is 1") == "12"  # first wins
    assert extract_answer("so the answer is 07") == "7"
    assert extract_answer("The answer is -3.") == "-3"
    assert extract_answer("7 + 5 = 12.") is None
    assert extract_answer("") is None


@pytest.mark.parametrize("fraction", [0.0, 0.12, 0.3])
def test_repetitive_fraction_as_configured(fraction):
    data = make_quickstart_data(seed=2, repeat_fraction=fraction, **SIZES)
    answers = [r["messages"][-1]["content"] for r in data["sft_train"]]
    assert sum(map(_is_repetitive, answers)) == round(fraction * len(answers))
    for text in filter(_is_repetitive, answers):
        # A correct answer, then the same final sentence again, several times.
        _, final = text.split(" The answer is", 1)
        final = "The answer is" + final
        sentence = final[: final.index(".") + 1]
        assert final == " ".join([sentence] * final.count("The answer is"))
        assert final.count("The answer is") >= 3
    # Eval references are always clean.
    assert not any(_is_repetitive(r["messages"][-1]["content"]) for r in data["sft_eval"])


def test_preference_pairs(any_split):
    _, data = any_split
    kinds = set()
    for record in data["pref_train"] + data["pref_eval"]:
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        assert chosen != rejected
        assert extract_answer(chosen) == record["answer"] and not _is_repetitive(chosen)
        wrong = extract_answer(rejected) != record["answer"]
        assert wrong or _is_repetitive(rejected), rejected
        kinds.add((wrong, _is_repetitive(rejected)))
    # Both failure modes DPO is meant to fix are represented.
    assert {(True, False), (False, True)} <= kinds


def test_write_quickstart_data_round_trips(tmp_path, data):
    paths = write_quickstart_data(tmp_path / "qs", seed=0, **SIZES)
    assert {name: p.name for name, p in paths.items()} == {s: f"{s}.jsonl" for s in SPLITS}
    for split, path in paths.items():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert records == data[split]


def test_examples_fit_the_quickstart_length(data):
    from jaxft.data.from_config import load_bundled_tokenizer

    tok = load_bundled_tokenizer()
    lengths = [len(tok.apply_chat_template(r["messages"])["input_ids"]) for r in data["sft_train"]]
    lengths += [len(tok.apply_chat_template(r["prompt"] + r[k])["input_ids"])
                for r in data["pref_train"] for k in ("chosen", "rejected")]
    assert max(lengths) <= 96


def test_tokenizer_text_is_frozen_and_covers_the_data():
    lines = tokenizer_training_text()
    assert lines == tokenizer_training_text()
    text = "\n".join(lines)
    assert "The answer is" in text and "The quick brown fox" in text
    assert all(op in text for op in (" + ", " - ", " * "))
    assert 50_000 < len(text) < 1_000_000


def test_bundled_quickstart_files_match_the_generator(tmp_path):
    """jaxft/assets/quickstart (what configs/sft.py:tiny trains on) is what the generator writes."""
    from jaxft.data.assets import QUICKSTART_DIR

    for split, path in write_quickstart_data(tmp_path).items():
        assert path.read_bytes() == (QUICKSTART_DIR / path.name).read_bytes(), (
            f"{QUICKSTART_DIR / path.name} is stale: run "
            "python -c 'from jaxft.quickstart.data import write_quickstart_data as w; w(\"jaxft/assets/quickstart\")'"
        )
