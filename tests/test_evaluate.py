"""Golden cases for the report metrics, and evaluate_generation / the CLI entry points end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jaxft.eval.folder as folder
import jaxft.eval.generation as gen
from jaxft.eval.metrics import exact_match, extract_final_answer, preference_accuracy, repetition_ratio

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "jaxft" / "assets" / "tokenizer"


def test_repetition_ratio_golden():
    assert repetition_ratio(["the cat sat on the mat"]) == 0.0  # "the" repeats, no 3-gram does
    # 3-grams: a-b-a, b-a-b, a-b-a (seen), b-a-b (seen) -> 2 of 4.
    assert repetition_ratio(["a b a b a b"]) == 0.5
    assert repetition_ratio(["a b a b a b"], n=2) == pytest.approx(3 / 5)
    assert repetition_ratio(["x x x x x"]) == pytest.approx(2 / 3)
    # Mean over outputs; shorter than n -> 0.
    assert repetition_ratio(["a b a b a b", "a b", ""]) == pytest.approx(0.5 / 3)
    assert repetition_ratio([]) == 0.0
    # Token ids work the same way.
    assert repetition_ratio([[1, 2, 1, 2, 1, 2]]) == 0.5
    # The quickstart's degenerate tail: "The answer is 7." repeated.
    once = "3 + 4 = 7. The answer is 7."
    looped = once + " The answer is 7." * 3
    assert repetition_ratio([once]) == 0.0 < repetition_ratio([looped])


def test_extract_and_exact_match():
    assert extract_final_answer("3 + 4 = 7. The answer is 7. The answer is 9.") == "7"  # first
    assert extract_final_answer("Add them: 3 and 4 make 7.") == "7"  # else the last number
    assert extract_final_answer("The answer is 1,200.") == "1200"
    assert extract_final_answer("the answer is -3.50") == "-3.5"
    assert extract_final_answer("no idea") is None
    preds = ["The answer is 12.", "It is 12.0", "The answer is 13", "nothing", "The answer is 007"]
    golds = ["12", 12, "12", "12", 7]
    assert exact_match(preds, golds) == pytest.approx(3 / 5)
    # A custom extractor (e.g. jaxft.quickstart.data.extract_answer) replaces the default.
    assert exact_match(["It is 12.0"], ["12"], extract=lambda t: None) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_preference_accuracy():
    # Implicit rewards chosen - rejected: (-1 - -2) - (-3 - -1) = 3 > 0; 0 - 1 < 0; tie -> wrong.
    acc = preference_accuracy([-1.0, -5.0, -2.0], [-3.0, -4.0, -2.0], [-2.0, -5.0, -1.0], [-1.0, -5.0, -1.0])
    assert acc == pytest.approx(1 / 3)
    assert preference_accuracy([-1.0, -2.0], [-2.0, -1.0]) == 0.5  # reference-free
    assert preference_accuracy([1.0], [0.0], [0.0], [0.0], beta=5.0) == 1.0


def test_evaluate_generation_scores_greedy_outputs(monkeypatch):
    calls = {}

    def fake_generate_text(model, tokenizer, prompts, **kw):
        calls.update(prompts=prompts, **kw)
        return ["The answer is 7.", "The answer is 5. The answer is 5. The answer is 5."]

    monkeypatch.setattr(gen, "generate_text", fake_generate_text)
    records = [
        {"messages": [{"role": "user", "content": "3 + 4?"}, {"role": "assistant", "content": "7"}],
         "answer": "7"},
        {"prompt": "2 + 2?", "answer": 4},
    ]
    result = gen.evaluate_generation(None, None, records, max_new_tokens=9, batch_size=4)
    assert calls["temperature"] == 0.0 and calls["max_new_tokens"] == 9
    assert calls["prompts"] == [[{"role": "user", "content": "3 + 4?"}], "2 + 2?"]  # reference dropped
    assert result["exact_match"] == 0.5
    assert result["repetition_ratio"] == pytest.approx(repetition_ratio(
        ["The answer is 7.", "The answer is 5. The answer is 5. The answer is 5."]))
    assert result["num_examples"] == 2
    assert result["samples"][1]["extracted"] == "5" and result["samples"][1]["answer"] == 4
    with pytest.raises(ValueError, match="record 0"):
        gen.evaluate_generation(None, None, [{"prompt": "x"}], max_new_tokens=1, batch_size=1)


@pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="no bundled tokenizer")
def test_cli_functions_end_to_end(tmp_path):
    import transformers

    from jaxft.inference.generate import generate_cli
    from jaxft.models import create_model, get_preset, save_hf

    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model_dir = tmp_path / "model"
    save_hf(create_model(get_preset("tiny").replace(num_layers=1)), model_dir, tokenizer=tok)
    data = tmp_path / "eval.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)} for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    result = folder.evaluate_folder(str(model_dir), str(data), max_new_tokens=4, limit=2)
    assert result["num_examples"] == 2 and 0.0 <= result["exact_match"] <= 1.0
    assert len(result["samples"]) == 2 and isinstance(result["samples"][0]["output"], str)

    texts = generate_cli(str(model_dir), ["hello", "hi there"], max_new_tokens=4, temperature=0.0,
                         top_k=0, top_p=1.0, chat=True)
    assert len(texts) == 2 and all(len(t) == 1 and isinstance(t[0], str) for t in texts)

    data.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        folder.evaluate_folder(str(model_dir), str(data), max_new_tokens=4, limit=None)
