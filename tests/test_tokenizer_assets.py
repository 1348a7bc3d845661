"""The bundled tokenizer (jaxft/assets/tokenizer): loads offline, special ids, digits, BOS,
chat template prefix property, and that the committed files are what the script produces."""

import json

import pytest
from transformers import AutoTokenizer

from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.quickstart.tokenizer import (
    BUNDLED_TOKENIZER_DIR, ROLE_TOKENS, VOCAB_SIZE, make_tokenizer,
)

SAMPLES = [
    "What is 17 + 25? The answer is 42.",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have?",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n and  double  spaces",
    "Unicode: héllo wörld, 日本語, emoji 😀, math × ÷ ≤",
    "x = 1234567890; y = -0.5e3",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 + 5?"},
     {"role": "assistant", "content": "7 + 5 = 12. The answer is 12."}],
    [{"role": "system", "content": "You are a helpful math tutor."},
     {"role": "user", "content": "Add 3 and 4."},
     {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"},
     {"role": "user", "content": "And 2 * 3?"},
     {"role": "assistant", "content": "6. The answer is 6. The answer is 6."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You're welcome."}],
    # Content that could merge with the template's newlines or markers if it were fragile.
    [{"role": "user", "content": "\n  spaced question \n"},
     {"role": "assistant", "content": "\n\nanswer with blank lines\n"},
     {"role": "user", "content": "é"},
     {"role": "assistant", "content": " 42"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)


def test_loads_offline_with_expected_special_ids(tok):
    # conftest sets HF_HUB_OFFLINE=1: this only works from the local folder.
    assert len(tok) == VOCAB_SIZE == 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.unk_token is None
    assert tok.convert_tokens_to_ids(list(ROLE_TOKENS)) == [3, 4, 5]
    assert set(ROLE_TOKENS) <= set(tok.all_special_tokens)
    assert tok.chat_template
    assert type(load_bundled_tokenizer()) is type(tok)


def test_role_markers_are_single_ids(tok):
    for i, marker in enumerate(ROLE_TOKENS):
        assert tok(f"x{marker}y", add_special_tokens=False).input_ids == [
            tok.convert_tokens_to_ids("x"), 3 + i, tok.convert_tokens_to_ids("y")]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_decode(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with_bos = tok(text).input_ids
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_digits_are_individual_tokens(tok):
    # No vocabulary entry joins a digit to anything, so every number is spelled digit by digit.
    for token in tok.get_vocab():
        if any(c.isdigit() for c in token):
            assert len(token) == 1, token
    ids = tok("In 2024, 17 + 25 = 42.", add_special_tokens=False).input_ids
    digit_tokens = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == list("2024172542")


def test_adds_bos_only(tok):
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok("hi", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_has_exactly_one_bos(tok, messages):
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # The rendered text carries its BOS: tokenize it without adding another.
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok(text, add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_prompt_is_prefix_and_assistant_turns_end_in_eos(tok, messages):
    full_ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    full_text = tok.apply_chat_template(messages, tokenize=False)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert full_ids[-1] == tok.eos_token_id
    assert full_ids.count(tok.eos_token_id) == len(turns)
    for k in turns:
        prompt_text = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True)["input_ids"]
        upto_ids = tok.apply_chat_template(messages[:k + 1], tokenize=True)["input_ids"]
        assert prompt_text.endswith("<|assistant|>\n")
        assert full_text.startswith(prompt_text)
        assert full_ids[:len(prompt_ids)] == prompt_ids
        # The completion is exactly the content's own tokens plus the closing EOS.
        content_ids = tok(messages[k]["content"], add_special_tokens=False).input_ids
        assert upto_ids[:len(prompt_ids)] == prompt_ids
        assert upto_ids[len(prompt_ids):] == content_ids + [tok.eos_token_id]


def test_chat_rendering_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert text == ("<s><|system|>\nYou are a helpful math tutor.\n<|user|>\nAdd 3 and 4.\n"
                    "<|assistant|>\n3 + 4 = 7. The answer is 7.</s>")


def test_unknown_role_is_an_error(tok):
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_script_reproduces_committed_files(tmp_path):
    written = make_tokenizer(tmp_path)
    committed = sorted(p for p in BUNDLED_TOKENIZER_DIR.iterdir() if p.is_file())
    assert [p.name for p in written] == [p.name for p in committed]
    for new, old in zip(written, committed):
        assert new.read_bytes() == old.read_bytes(), (
            f"{old} is stale: run `python -m jaxft.quickstart.tokenizer` and commit the result")


def test_assets_are_small():
    total = sum(p.stat().st_size for p in BUNDLED_TOKENIZER_DIR.iterdir())
    assert total < 64_000
    merges = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == VOCAB_SIZE - 256 - 6
