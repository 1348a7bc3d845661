"""`jaxft eval` on a model folder: eval loss equals a hand computation, preference accuracy."""

import json

import numpy as np
import pytest

from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.tokenize import load_examples
from jaxft.eval.folder import evaluate_folder
from jaxft.eval.likelihood import eval_loss, preference_eval
from tests.quickstart_subset import tiny_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model"))


def test_eval_loss_equals_hand_computation(model_dir, tmp_path):
    from jaxft.models import load_hf

    records = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                             {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}], "answer": "5"}]
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(records[0]) + "\n")
    model, tok = load_hf(model_dir), load_bundled_tokenizer()
    example = load_examples(str(path), tok, kind="sft", max_length=128).examples[0]
    logits = np.asarray(model(example.input_ids[None].astype(np.int32)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    targets = example.input_ids[1:]
    mask = example.loss_mask[1:].astype(bool)
    expected = -logp[np.arange(len(targets)), targets][mask].mean()
    got = eval_loss(model, tok, str(path), max_length=128)["eval_loss"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_preference_eval_against_itself_has_no_reward_wins(model_dir):
    from jaxft.models import load_hf

    model, tok = load_hf(model_dir), load_bundled_tokenizer()
    out = preference_eval(model, tok, "jaxft/assets/quickstart/pref_eval.jsonl", reference=model, max_length=128)
    assert out["num_pairs"] == 200
    assert out["reward_accuracy"] == 0.0  # rewards are exactly 0: ties never count as wins
    assert 0.0 <= out["preference_accuracy"] <= 1.0


def test_eval_cli_reports_everything(model_dir):
    out = evaluate_folder(str(model_dir), "jaxft/assets/quickstart/sft_eval.jsonl",
                   pairs_file="jaxft/assets/quickstart/pref_eval.jsonl", limit=8, max_new_tokens=8, max_length=128)
    for key in ("exact_match", "repetition_ratio", "eval_loss", "preference_accuracy", "samples"):
        assert key in out
    assert np.isfinite(out["eval_loss"])


def test_generate_cli_puts_string_prompts_under_the_chat_template(model_dir):
    from jaxft.inference.generate import encode_prompts, generate_cli, generate_text
    from jaxft.models import load_hf

    tok = load_bundled_tokenizer()
    chat_ids = encode_prompts(tok, ["What is 2 + 3?"], chat=True)[0]
    assert chat_ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    expected = generate_text(load_hf(model_dir), tok, ["What is 2 + 3?"], chat=True, max_new_tokens=6)
    assert generate_cli(str(model_dir), ["What is 2 + 3?"], max_new_tokens=6) == [expected]


def test_generate_cli_samples_stop_and_seed(model_dir, capsys):
    """`jaxft generate --samples K --seed S` prints sample_completions' K samples (seeds S, S + 1);
    `--stop` (repeatable) cuts the text before the first stop string."""
    from jaxft import cli
    from jaxft.inference.completions import sample_completions
    from jaxft.models import load_hf

    model, tok = load_hf(model_dir), load_bundled_tokenizer()
    prompt = "What is 2 + 3?"
    cli.main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "8",
              "--temperature", "1.0", "--samples", "2", "--seed", "3"])
    got = capsys.readouterr().out
    samples = sample_completions(model, tok, [prompt], samples=2, seed=3, temperature=1.0, max_new_tokens=8,
                                 chat=True)[0]
    assert samples[0].text != samples[1].text  # seeds 3 and 4, not one sample twice
    assert got == f">>> {prompt}\n--- sample 1 of 2\n{samples[0].text}\n--- sample 2 of 2\n{samples[1].text}\n\n"

    greedy = sample_completions(model, tok, [prompt], max_new_tokens=8, chat=True)[0][0].text
    stop = greedy[len(greedy) // 2:][:2]  # a piece from the middle of the greedy text
    assert stop.strip() and greedy.find(stop) > 0
    cli.main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "8",
              "--stop", "never in it", "--stop", stop])
    assert capsys.readouterr().out == f">>> {prompt}\n{greedy[:greedy.find(stop)]}\n\n"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(model_dir), "--prompt", prompt, "--samples", "2"])
    assert "--samples 2 with --temperature 0" in capsys.readouterr().err
