"""Bad records and sources: each names its file, line and field; skip_invalid counts them;
fuzzed records only ever raise DataError."""

import copy
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from jaxft.data.formats import DataError
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.tokenize import Encoder, load_examples, process_record


@pytest.fixture(scope="module")
def tok():
    return load_bundled_tokenizer()


GOOD_SFT = {"prompt": "2+2=", "completion": "4"}
GOOD_DPO = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}

# (bad line as written to the file, kind, expected message after "FILE line 2: ")
CASES = [
    ('{"prompt": "a", "completion": ', "sft", "invalid JSON: Expecting value (column 31)"),
    ('[1, 2]', "sft", "a record must be a JSON object (dict) with named fields, got a list"),
    ('{"prompt": "a"}', "sft", "field 'completion' is missing"),
    ('{"prompt": "a", "completion": null}', "sft", "field 'completion' is missing"),
    ('{"prompt": 3, "completion": "b"}', "sft",
     "field 'prompt' must be a string or a list of messages, got a number"),
    ('{"prompt": "a", "completion": ["b"]}', "sft", "field 'completion' must be a string, got a list"),
    ('{"prompt": "a", "completion": "  "}', "sft", "field 'completion' is empty"),
    ('{"text": ""}', "sft", "field 'text' is empty"),
    ('{"title": "x"}', "sft", "record matches no known format (its fields: 'title')"),
    ('{"messages": "hi"}', "sft", "field 'messages' must be a list of messages"),
    ('{"messages": []}', "sft", "field 'messages' is empty"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "sft",
     "field 'messages' must end with an assistant turn (the last message is 'user')"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"content": "x"}]}', "sft",
     "field 'messages[1].role' is missing"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "sft",
     "field 'messages[0].content' is missing"),
    ('{"messages": [{"role": "bot", "content": "Hi"}]}', "sft",
     "field 'messages[0].role' is 'bot'; expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "sft",
     "field 'messages[0].content' must be a string (or a list of text parts), got a number"),
    ('{"messages": ["hi"]}', "sft", "field 'messages[0]' must be a message object"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "sft",
     "field 'messages' starts with an assistant turn"),
    ('{"text": "\\ud800"}', "sft", "field 'text' is not valid Unicode (unpaired surrogate)"),
    ('{"prompt": "a", "chosen": "", "rejected": "b"}', "dpo", "field 'chosen' is empty"),
    ('{"prompt": "a", "chosen": "b"}', "dpo", "field 'rejected' is missing"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "dpo",
     "fields 'chosen' and 'rejected' are identical"),
    ('{"chosen": "b", "rejected": "c"}', "dpo",
     "field 'chosen' is a string but there is no 'prompt' field"),
    (json.dumps({"chosen": [U, A], "rejected": [U, A]}), "dpo",
     "fields 'chosen' and 'rejected' are identical"),
    (json.dumps({"chosen": [A], "rejected": [{"role": "assistant", "content": "no"}]}), "dpo",
     "fields 'chosen' and 'rejected' share no leading messages, so there is no implicit prompt"),
    (json.dumps({"chosen": [U, A], "rejected": [U, A, U, A]}), "dpo",
     "field 'chosen' has no messages after the prompt it shares"),
    (json.dumps({"chosen": [U, A, U, A], "rejected": [U, {"role": "assistant", "content": "x"}]}),
     "dpo", "field 'chosen[2].role' is 'user'; after the shared prompt only assistant turns"),
    (json.dumps({"prompt": [U], "chosen": [U, A], "rejected": [A]}), "dpo",
     "field 'chosen[0].role' is 'user', but completion turns must be assistant turns"),
    (json.dumps(GOOD_DPO), "sft", "a 'preference' record cannot be used for sft; sft accepts "
                                  "text, prompt_completion, conversational, "
                                  "conversational_prompt_completion (is this dpo data?)"),
    ('{"text": "hello"}', "dpo", "a 'text' record cannot be used for dpo; dpo accepts preference, "
                                 "conversational_preference, implicit_preference"),
]


def write(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


@pytest.mark.parametrize("line,kind,message", CASES)
def test_bad_record_names_file_line_and_field(tok, tmp_path, line, kind, message):
    good = json.dumps(GOOD_SFT if kind == "sft" else GOOD_DPO)
    path = write(tmp_path, [good, line, good])
    with pytest.raises(DataError) as err:
        load_examples(str(path), tok, kind=kind, max_length=64)
    assert str(err.value).startswith(f"{path} line 2: {message}")
    assert err.value.location == f"{path} line 2"
    # skip_invalid: counted and reported, the good records still load.
    s = load_examples(str(path), tok, kind=kind, max_length=64, skip_invalid=True)
    assert [e.index for e in s.examples] == [0, 2]
    assert s.report.num_skipped == 1 and s.report.errors[0][0] == f"{path} line 2"


def test_non_utf8_bytes_name_the_line(tok, tmp_path):
    path = write(tmp_path, [json.dumps(GOOD_SFT), b'{"text": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"train.jsonl line 2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_examples(str(path), tok, kind="sft", max_length=64)


def test_chat_template_errors_name_the_record(tok, tmp_path):
    mistral_like = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
                    "{% endfor %}")
    path = write(tmp_path, [json.dumps({"messages": [U, A, A]})], name="c.jsonl")
    with pytest.raises(DataError, match=r"c.jsonl line 1: the chat template rejects this record: "
                                        r"roles must alternate"):
        load_examples(str(path), tok, kind="sft", max_length=64, chat_template=mistral_like)


def test_no_chat_template_says_how_to_fix(tok, tmp_path):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    path = write(tmp_path, [json.dumps(GOOD_SFT), json.dumps({"messages": [U, A]})])
    for skip in (False, True):  # a set-up problem: never skipped
        with pytest.raises(DataError, match=r"train.jsonl line 2: this record is conversational but "
                                            r"the tokenizer has no chat template; use a tokenizer "
                                            r"that has one \(model.tokenizer\) or set data.chat_template"):
            load_examples(str(path), bare, kind="sft", max_length=64, skip_invalid=skip)


def test_named_format_the_command_cannot_use_fails_before_reading(tok):
    with pytest.raises(ValueError, match=r"data format 'text' cannot be used for dpo; dpo accepts "
                                         r"'auto' or preference, conversational_preference"):
        load_examples("never-read.jsonl", tok, kind="dpo", max_length=64, fmt="text")


@pytest.mark.parametrize("source,message", [
    ("missing.jsonl", "missing.jsonl: file not found"),
    ("data/*.parquet", "data/*.parquet: no files match this pattern"),
    ("nobody/no-such-dataset", "nobody/no-such-dataset: not a local file or folder, and not a "
                               "hub dataset that could be loaded"),
])
def test_bad_sources_name_themselves(tok, tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_examples(source, tok, kind="sft", max_length=64)
    assert str(err.value).startswith(message)


def test_broken_json_document_names_the_line(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"d.json line 3: invalid JSON: Expecting property name"):
        load_examples(str(path), tok, kind="sft", max_length=64)
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}]')
    with pytest.raises(DataError, match=r"d.json line 3: not valid UTF-8 \(byte 0xff\)"):
        load_examples(str(path), tok, kind="sft", max_length=64)


def test_skip_invalid_counts_logs_and_caps_warnings(tok, tmp_path, caplog):
    lines = [json.dumps(GOOD_SFT)] + ['{"prompt": "a"}'] * 15 + ["not json"] + [json.dumps(GOOD_SFT)]
    path = write(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        s = load_examples(str(path), tok, kind="sft", max_length=64, skip_invalid=True)
    r = s.report
    assert (r.num_records, r.num_skipped, r.num_examples) == (18, 16, 2)
    assert [e.index for e in s.examples] == [0, 17]
    assert r.errors[0] == (f"{path} line 2", "field 'completion' is missing")
    assert r.errors[-1] == (f"{path} line 17", "invalid JSON: Expecting value (column 1)")
    warnings = [rec.getMessage() for rec in caplog.records]
    assert len(warnings) == 11  # ten skips, then a summary
    assert warnings[0] == f"skipping invalid record: {path} line 2: field 'completion' is missing"
    assert warnings[-1] == f"{path}: skipped 16 invalid records of 18 (the first 10 are logged above)"
    with pytest.raises(DataError, match=r"no usable examples \(3 records: 3 invalid"):
        load_examples(str(write(tmp_path, ["{}"] * 3, "bad.jsonl")), tok, kind="sft",
                      max_length=64, skip_invalid=True)


# --- fuzzing --------------------------------------------------------------------------------

KEYS = ["text", "prompt", "completion", "messages", "chosen", "rejected", "role", "content", "x",
        "tools", "tool_calls", "function", "name", "arguments", "type"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["user", "assistant", "system", "", " "]))
messages = st.lists(st.fixed_dictionaries(
    {}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "bot"]), scalars),
                  "content": st.one_of(st.text(max_size=12), scalars)}), max_size=4)
values = st.recursive(st.one_of(scalars, messages),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
# Near-valid records reach the tokenizer and chat template; mutations break one field.
content = st.one_of(st.text(min_size=1, max_size=16), st.sampled_from(
    ["</s>", "<s>", "<|user|>", "<|assistant|>\n", "{{ x }}", " x", "\n", "7 + 5 = 12."]))


def _conversation(contents, system):
    """user, assistant, user, ... ending with an assistant turn, after an optional system turn."""
    if len(contents) % 2:
        contents = contents + ["ok"]
    msgs = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    return ([{"role": "system", "content": system}] if system else []) + msgs


conversation = st.builds(_conversation, st.lists(content, min_size=1, max_size=4),
                         st.none() | content)
replies = st.lists(content.map(lambda c: {"role": "assistant", "content": c}), min_size=1, max_size=2)
near_valid = st.one_of(
    st.fixed_dictionaries({"text": content}),
    st.fixed_dictionaries({"prompt": content, "completion": content}),
    st.fixed_dictionaries({"messages": conversation}),
    st.fixed_dictionaries({"prompt": conversation, "completion": replies}),
    st.fixed_dictionaries({"prompt": content, "chosen": content, "rejected": content}),
    st.fixed_dictionaries({"prompt": conversation, "chosen": replies, "rejected": replies}),
    st.builds(lambda p, c, r: {"chosen": p + c, "rejected": p + r}, conversation, replies, replies),
)
mutated = st.builds(lambda r, k, v: {**r, k: v}, near_valid, st.sampled_from(KEYS), values)
records = st.one_of(near_valid, near_valid, mutated,
                    st.dictionaries(st.sampled_from(KEYS), values, max_size=4), values)


@pytest.fixture(scope="module")
def encoders(tok):
    assets = Path(__file__).parent / "assets"
    return [Encoder(tok)] + [Encoder(AutoTokenizer.from_pretrained(assets / name))
                             for name in ("mistral_v1", "gpt2_chatml")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records, kind=st.sampled_from(["sft", "dpo"]),
       fmt=st.sampled_from(["auto", "auto", "text", "conversational", "implicit_preference"]),
       max_length=st.integers(2, 64), which=st.integers(0, 2),
       truncation=st.sampled_from(["truncate_completion", "drop"]))
def test_fuzzed_records_only_raise_data_error(encoders, record, kind, fmt, max_length, which,
                                              truncation):
    try:
        _, example, status, _ = process_record(
            encoders[which], record, 0, "fuzz line 1", kind=kind, fmt=fmt, max_length=max_length,
            truncation=truncation, completion_only_loss=True)
    except DataError as err:
        assert str(err).startswith("fuzz line 1: ")
        return
    # Whatever loads fits max_length and trains at least one token.
    if example is not None:
        masks = [getattr(example, k) for k in ("loss_mask", "chosen_mask", "rejected_mask")
                 if hasattr(example, k)]
        assert all(0 < m.sum() and len(m) <= max_length for m in masks)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=30), max_size=5))
def test_fuzzed_jsonl_bytes_only_raise_data_error(tok, tmp_path, lines):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        load_examples(str(path), tok, kind="sft", max_length=32, skip_invalid=True)
    except DataError as err:
        assert "no usable examples" in str(err)
