"""Token ids and loss masks: golden values per format and tokenizer, BOS/EOS rules, truncation.

Golden ids were produced once, decoded and checked by eye (the comment above each shows the
decoded tokens, [bracketed] = trained), then frozen. Tokenizers:
  bundled  byte-level BPE, template writes BOS, assistant turns end with </s>
  mistral  Mistral 7B's SentencePiece vocabulary, [INST] template writing BOS, no generation tags
  chatml   GPT-2's byte-level BPE with a ChatML template; no BOS, <|im_end|> ends a turn, but
           EOS (= pad) is <|endoftext|>
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxft.data.batch import PreferenceExample, SFTExample
from jaxft.data.formats import DataError, parse_record
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.tokenize import Encoder, encode_record, load_examples

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def toks():
    return {
        "bundled": load_bundled_tokenizer(),
        "mistral": AutoTokenizer.from_pretrained(ASSETS / "mistral_v1"),
        "chatml": AutoTokenizer.from_pretrained(ASSETS / "gpt2_chatml"),
    }


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


RECORDS = {
    "text": {"text": "Hi there."},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "conversational": {"messages": [{"role": "system", "content": "Be brief."}, user("1+1?"),
                                    bot("2"), user("2+3?"), bot("5")]},
    "conversational_prompt_completion": {"prompt": [user("1+1?")], "completion": [bot("2")]},
    "preference": {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    "conversational_preference": {"prompt": [user("1+1?")], "chosen": [bot("2")],
                                  "rejected": [bot("3")]},
    "implicit_preference": {"chosen": [user("1+1?"), bot("2")], "rejected": [user("1+1?"), bot("3")]},
}


def M(s):
    """Mask from a string of 0/1 (spaces ignored)."""
    return [int(c) for c in s.replace(" ", "")]


# (tokenizer, format) -> [(ids, mask)] (one sequence for SFT, chosen then rejected for pairs)
_B_PROMPT = [1, 4, 204, 22, 16, 22, 36, 204, 5, 204]  # <s> <|user|> \n 1 + 1 ? \n <|assistant|> \n
_M_PROMPT = [1, 733, 16289, 28793, 28705, 28740, 28806, 28740, 28804, 733, 28748, 16289, 28793]
# <s> ▁[ INST ] ▁ 1 + 1 ? ▁[ / INST ]
_C_PROMPT = [50257, 10057, 198, 1639, 389, 257, 7613, 8796, 13, 50258, 198, 50257, 7220, 198, 16,
             10, 16, 30, 50258, 198, 50257, 562, 10167, 198]
# <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n
# <|im_start|>assistant\n   (the template's default system prompt)
GOLDEN = {
    # <s> [H] [i] [Ġthere] [.] [</s>]
    ("bundled", "text"): [([1, 45, 78, 430, 19, 2], M("0 11111"))],
    # <s> 2 + 2 = [4] [</s>]
    ("bundled", "prompt_completion"): [([1, 23, 16, 23, 34, 25, 2], M("00000 11"))],
    # <s> <|system|> \n B e Ġb ri ef . \n <|user|> \n 1 + 1 ? \n <|assistant|> \n [2] [</s>]
    #     <|user|> \n 2 + 3 ? \n <|assistant|> \n [5] [</s>]
    ("bundled", "conversational"): [(
        [1, 3, 204, 39, 74, 278, 506, 380, 19, 204, 4, 204, 22, 16, 22, 36, 204, 5, 204, 23, 2,
         4, 204, 23, 16, 24, 36, 204, 5, 204, 26, 2],
        M("0000000000000000000 11 000000000 11"))],
    ("bundled", "conversational_prompt_completion"): [(_B_PROMPT + [23, 2], M("0" * 10 + "11"))],
    ("bundled", "preference"): [([1, 23, 16, 23, 34, 25, 2], M("00000 11")),
                                ([1, 23, 16, 23, 34, 26, 2], M("00000 11"))],
    ("bundled", "conversational_preference"): [(_B_PROMPT + [23, 2], M("0" * 10 + "11")),
                                               (_B_PROMPT + [24, 2], M("0" * 10 + "11"))],
    # <s> [▁Hi] [▁there] [.] [</s>]
    ("mistral", "text"): [([1, 15359, 736, 28723, 2], M("0 1111"))],
    # <s> ▁ 2 + 2 = [▁] [4] [</s>]  (the completion, tokenized alone, gets SentencePiece's "▁")
    ("mistral", "prompt_completion"): [([1, 28705, 28750, 28806, 28750, 28746, 28705, 28781, 2],
                                        M("000000 111"))],
    # <s> ▁[ INST ] ▁Be ▁brief . \n \n 1 + 1 ? ▁[ / INST ] [▁] [2] [</s>]
    #     ▁[ INST ] ▁ 2 + 3 ? ▁[ / INST ] [▁] [5] [</s>]
    ("mistral", "conversational"): [(
        [1, 733, 16289, 28793, 1739, 6817, 28723, 13, 13, 28740, 28806, 28740, 28804, 733, 28748,
         16289, 28793, 28705, 28750, 2, 733, 16289, 28793, 28705, 28750, 28806, 28770, 28804, 733,
         28748, 16289, 28793, 28705, 28782, 2],
        M("00000000000000000 111 000000000000 111"))],
    ("mistral", "conversational_prompt_completion"): [(_M_PROMPT + [28705, 28750, 2],
                                                       M("0" * 13 + "111"))],
    ("mistral", "preference"): [([1, 28705, 28750, 28806, 28750, 28746, 28705, 28781, 2], M("000000 111")),
                                ([1, 28705, 28750, 28806, 28750, 28746, 28705, 28782, 2], M("000000 111"))],
    ("mistral", "conversational_preference"): [(_M_PROMPT + [28705, 28750, 2], M("0" * 13 + "111")),
                                               (_M_PROMPT + [28705, 28770, 2], M("0" * 13 + "111"))],
    # Hi [Ġthere] [.] [<|endoftext|>]   (no BOS: the first text token is the untrained one)
    ("chatml", "text"): [([17250, 612, 13, 50256], M("0 111"))],
    # 2 + 2 = [4] [<|endoftext|>]
    ("chatml", "prompt_completion"): [([17, 10, 17, 28, 19, 50256], M("0000 11"))],
    # <|im_start|> system \n Be Ġbrief . <|im_end|> \n <|im_start|> user \n 1 + 1 ? <|im_end|> \n
    # <|im_start|> ass istant \n [2] [<|im_end|>] [\n] <|im_start|> user \n 2 + 3 ? <|im_end|> \n
    # <|im_start|> ass istant \n [5] [<|im_end|>] [\n] [<|endoftext|>]
    ("chatml", "conversational"): [(
        [50257, 10057, 198, 3856, 4506, 13, 50258, 198, 50257, 7220, 198, 16, 10, 16, 30, 50258, 198,
         50257, 562, 10167, 198, 17, 50258, 198, 50257, 7220, 198, 17, 10, 18, 30, 50258, 198, 50257,
         562, 10167, 198, 20, 50258, 198, 50256],
        M("000000000000000000000 111 0000000000000 1111"))],
    ("chatml", "conversational_prompt_completion"): [(_C_PROMPT + [17, 50258, 198, 50256],
                                                      M("0" * 24 + "1111"))],
    ("chatml", "preference"): [([17, 10, 17, 28, 19, 50256], M("0000 11")),
                               ([17, 10, 17, 28, 20, 50256], M("0000 11"))],
    ("chatml", "conversational_preference"): [(_C_PROMPT + [17, 50258, 198, 50256], M("0" * 24 + "1111")),
                                              (_C_PROMPT + [18, 50258, 198, 50256], M("0" * 24 + "1111"))],
}
# The implicit prompt is the shared [user] turn, so the pair encodes as the explicit one.
for _name in ("bundled", "mistral", "chatml"):
    GOLDEN[(_name, "implicit_preference")] = GOLDEN[(_name, "conversational_preference")]


def encode(tok, record, max_length=256, truncation="truncate_completion", **kw):
    example, status, _ = encode_record(Encoder(tok), parse_record(record, "rec"), 0, "rec",
                                       max_length=max_length, truncation=truncation, **kw)
    return example, status


def sequences(example):
    if isinstance(example, SFTExample):
        return [(example.input_ids.tolist(), example.loss_mask.tolist())]
    return [(example.chosen_ids.tolist(), example.chosen_mask.tolist()),
            (example.rejected_ids.tolist(), example.rejected_mask.tolist())]


@pytest.mark.parametrize("name,fmt", sorted(GOLDEN))
def test_golden_ids_and_masks(toks, name, fmt):
    tok = toks[name]
    example, status = encode(tok, RECORDS[fmt])
    assert status == "ok"
    assert isinstance(example, PreferenceExample if "preference" in fmt else SFTExample)
    got = sequences(example)
    assert got == GOLDEN[(name, fmt)]
    arrays = [v for v in vars(example).values() if isinstance(v, np.ndarray)]
    assert arrays and all(a.dtype == np.int32 for a in arrays)
    turns = sum(m["role"] == "assistant" for m in RECORDS[fmt].get("messages", []))
    # One EOS per assistant turn where the template ends turns with it, else one at the end.
    eos_count = turns if turns and name != "chatml" else 1
    for ids, mask in got:
        # Exactly one BOS, first, when the tokenizer uses one; none otherwise.
        bos = tok.bos_token_id
        if name == "chatml":
            assert bos is None
        else:
            assert ids[0] == bos and ids.count(bos) == 1
        # EOS last and trained; the first token never trained.
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1 and mask[0] == 0
        assert ids.count(tok.eos_token_id) == eos_count


def test_pair_prompt_is_shared_and_untrained(toks):
    for name, tok in toks.items():
        for fmt in ("preference", "conversational_preference", "implicit_preference"):
            example, _ = encode(tok, RECORDS[fmt])
            (c, cm), (r, rm) = sequences(example)
            n = cm.index(1)
            assert rm.index(1) == n and c[:n] == r[:n], (name, fmt)
            assert not any(cm[:n]) and all(cm[n:]) and all(rm[n:])


def test_implicit_prompt_is_longest_shared_prefix(toks):
    shared = [{"role": "system", "content": "Be kind."}, user("Hi"), bot("Hello!"), user("1+1?")]
    implicit = {"chosen": shared + [bot("2")], "rejected": shared + [bot("3")]}
    record = parse_record(implicit, "rec")
    assert record.format == "implicit_preference"
    assert record.prompt == shared and record.chosen == [bot("2")] and record.rejected == [bot("3")]
    explicit = {"prompt": shared, "chosen": [bot("2")], "rejected": [bot("3")]}
    for tok in toks.values():
        a, _ = encode(tok, implicit)
        b, _ = encode(tok, explicit)
        assert sequences(a) == sequences(b)
        # The earlier assistant turn belongs to the prompt: not trained in a DPO pair.
        (ids, mask), _ = sequences(a)
        assert mask.count(1) == len(ids) - mask.index(1)


def test_multi_turn_trains_every_assistant_turn_only(toks):
    tok = toks["bundled"]
    example, _ = encode(tok, RECORDS["conversational"])
    ids, mask = sequences(example)[0]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "2</s>5</s>"
    # conversational prompt/completion: earlier assistant turns in the prompt are not trained.
    rec = {"prompt": [user("1+1?"), bot("2"), user("2+3?")], "completion": [bot("5")]}
    example, _ = encode(tok, rec)
    ids, mask = sequences(example)[0]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "5</s>"


def test_pad_equal_to_eos_keeps_eos_trained(toks):
    for name in ("bundled", "mistral"):
        tok = copy.deepcopy(toks[name])
        tok.pad_token = tok.eos_token
        assert tok.pad_token_id == tok.eos_token_id
        for fmt in RECORDS:
            example, _ = encode(tok, RECORDS[fmt])
            assert sequences(example) == GOLDEN[(name, fmt)], (name, fmt)
    assert toks["chatml"].pad_token_id == toks["chatml"].eos_token_id  # pad == eos natively


def test_template_without_bos_gets_exactly_one(toks):
    tok = copy.deepcopy(toks["bundled"])
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    example, _ = encode(tok, RECORDS["conversational"])
    assert sequences(example) == GOLDEN[("bundled", "conversational")]


def test_eos_never_doubled(toks):
    tok = toks["bundled"]
    # A completion whose text already ends in the EOS token.
    example, _ = encode(tok, {"prompt": "2+2=", "completion": "4</s>"})
    assert sequences(example) == GOLDEN[("bundled", "prompt_completion")]
    # A template that writes whitespace after the EOS of an assistant turn.
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = tok.chat_template.replace("{{ eos_token }}", "{{ eos_token + '\\n' }}")
    example, _ = encode(tok2, RECORDS["conversational"])
    ids, mask = sequences(example)[0]
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == 204 and mask[-2:] == [1, 1]


def test_eos_appended_when_template_ends_turn_otherwise(toks):
    tok = toks["chatml"]  # ends turns with <|im_end|>, EOS is <|endoftext|>
    example, _ = encode(tok, RECORDS["conversational"])
    ids, mask = sequences(example)[0]
    assert ids[-4:] == [20, 50258, 198, 50256] and mask[-4:] == [1, 1, 1, 1]
    assert ids.count(50256) == 1


def test_completion_only_loss_false_trains_all_but_first(toks):
    for name, tok in toks.items():
        for fmt in ("prompt_completion", "conversational"):
            example, _ = encode(tok, RECORDS[fmt], completion_only_loss=False)
            (ids, mask), = sequences(example)
            assert ids == GOLDEN[(name, fmt)][0][0]
            assert mask == [0] + [1] * (len(ids) - 1)


def test_chat_template_argument_overrides(toks, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(RECORDS["conversational_prompt_completion"]) + "\n")
    tok = copy.deepcopy(toks["chatml"])
    tok.chat_template = None
    loaded = load_examples(str(path), tok, kind="sft", max_length=64,
                           chat_template=toks["chatml"].chat_template)
    assert sequences(loaded.examples[0]) == GOLDEN[("chatml", "conversational_prompt_completion")]


def test_template_that_rewrites_earlier_turns_is_an_error(toks):
    # Like Qwen3's thinking templates: earlier assistant turns render differently once a later
    # turn follows, so a rendered prefix is not a token prefix of the whole conversation.
    tok = copy.deepcopy(toks["bundled"])
    tok.chat_template = tok.chat_template.replace(
        "message['content'] }}", "(message['content'] if loop.last or message['role'] != "
        "'assistant' else '...') }}")
    encode(tok, RECORDS["conversational_prompt_completion"])  # one turn: fine
    with pytest.raises(DataError, match=r"rec: the chat template renders the first 3 messages "
                                        r"differently .*\(not a token prefix\)"):
        encode(tok, RECORDS["conversational"])


# --- truncation -------------------------------------------------------------------------------

LONG = {"prompt": "2+2=", "completion": "4 and some more words"}  # bundled: 5 prompt tokens


def test_truncate_completion_keeps_prompt_and_cuts_the_end(toks):
    tok = toks["bundled"]
    full, status = encode(tok, LONG)
    assert status == "ok"
    ids, mask = sequences(full)[0]
    assert len(ids) > 9
    cut, status = encode(tok, LONG, max_length=9)
    assert status == "truncated"
    assert sequences(cut) == [(ids[:9], mask[:9])]  # the EOS goes with the cut
    assert cut.input_ids[-1] != tok.eos_token_id and cut.loss_mask[5:].all()
    # Room for exactly one completion token: kept.
    one, status = encode(tok, LONG, max_length=6)
    assert status == "truncated" and one.loss_mask.tolist() == [0] * 5 + [1]


def test_prompt_that_fills_max_length_is_dropped(toks):
    for mode in ("truncate_completion", "drop"):
        example, status = encode(toks["bundled"], LONG, max_length=5, truncation=mode)
        assert example is None and status == "prompt_too_long"


def test_drop_mode_drops_over_long_examples(toks):
    tok = toks["bundled"]
    example, status = encode(tok, LONG, max_length=9, truncation="drop")
    assert example is None and status == "too_long"
    n = len(encode(tok, LONG)[0])
    example, status = encode(tok, LONG, max_length=n, truncation="drop")
    assert status == "ok" and len(example) == n


def test_dpo_truncation_fits_both_sequences(toks):
    tok = toks["bundled"]
    pair = {"prompt": "2+2=", "chosen": "4", "rejected": "5 or maybe 6 or 7 or 8"}
    example, status = encode(tok, pair, max_length=8)
    assert status == "truncated"
    assert len(example.chosen_ids) == 7 and len(example.rejected_ids) == 8
    assert example.chosen_ids[-1] == tok.eos_token_id
    assert example.rejected_mask.tolist() == [0] * 5 + [1] * 3
    example, status = encode(tok, pair, max_length=8, truncation="drop")
    assert example is None and status == "too_long"
    example, status = encode(tok, pair, max_length=5)
    assert example is None and status == "prompt_too_long"


def test_load_examples_counts_truncation_and_drops(toks, tmp_path):
    path = tmp_path / "d.jsonl"
    records = [LONG, {"prompt": "x" * 40, "completion": "y"}, RECORDS["prompt_completion"], LONG]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = toks["bundled"]
    s = load_examples(str(path), tok, kind="sft", max_length=9)
    r = s.report
    assert (r.num_records, r.num_examples, r.num_truncated, r.num_dropped_too_long,
            r.num_prompt_too_long) == (4, 3, 2, 1, 1)
    assert [e.index for e in s.examples] == [0, 2, 3]  # index = record index in the source
    assert r.lengths == [9, 7, 9] and len(r.raw_lengths) == 4 and r.raw_lengths[1] > 9
    s = load_examples(str(path), tok, kind="sft", max_length=9, truncation="drop")
    assert [e.index for e in s.examples] == [2] and s.report.num_dropped_too_long == 3
    s = load_examples(str(path), tok, kind="sft", max_length=64, limit=2)
    assert s.report.num_records == 2 and len(s.examples) == 2
    with pytest.raises(DataError, match=r"d.jsonl: no usable examples \(4 records: 0 invalid, 4 "
                                        r"longer than max_length 4\)"):
        load_examples(str(path), tok, kind="sft", max_length=4)


def test_repeated_conversational_records_give_identical_examples(toks, tmp_path):
    path = tmp_path / "q.jsonl"
    rec = {"messages": [{"role": "system", "content": "You are a helpful math tutor."},
                        user("What is 7 + 5?"), bot("7 + 5 = 12. The answer is 12.")]}
    path.write_text((json.dumps(rec) + "\n") * 500)
    s = load_examples(str(path), toks["bundled"], kind="sft", max_length=128)
    assert [e.index for e in s.examples] == list(range(500))
    for e in s.examples:  # the encoder keeps no state between records
        np.testing.assert_array_equal(e.input_ids, s.examples[0].input_ids)
        np.testing.assert_array_equal(e.loss_mask, s.examples[0].loss_mask)
