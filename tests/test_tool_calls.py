"""Tool calling and richer chats: what is trained in a tool-call conversation on two released
chat templates with tool support, tools reaching the template, content parts, and records with
nothing to train.

Tokenizers: GPT-2's byte-level BPE (tests/assets/gpt2_chatml) given each model family's
pre-tokenizer regex and special tokens, with the model's own chat template, as released
(tests/assets/tool_templates/README.md says where they come from):
  qwen   Qwen2.5-Instruct: tools in the system prompt, calls as <tool_call> JSON, results as
         <tool_response> in a user turn; EOS <|im_end|>, no BOS
  llama  Llama 3.1 Instruct: tools in the first user turn, a call as bare JSON with
         "parameters", results in an ipython turn; BOS <|begin_of_text|>, EOS <|eot_id|>
"""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from jaxft.data.formats import DataError, parse_record
from jaxft.data.tokenize import DataReport, Encoder, ToolTemplateError, encode_record, load_examples

ASSETS = Path(__file__).parent / "assets"
# The pre-tokenizer regexes of Qwen2's and Llama 3's tokenizer.json (they differ in digits).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _tokenizer(template: str, split: str, *, eos: str, bos: str | None = None, special=(), added=()):
    tok = AutoTokenizer.from_pretrained(ASSETS / "gpt2_chatml")
    tok.add_tokens(list(special), special_tokens=True)
    tok.add_tokens(list(added))
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {})})
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if bos:  # Llama 3's tokenizer puts BOS before text, and its template writes one too
        backend.post_processor = TemplateProcessing(single=f"{bos} $A",
                                                    special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = (ASSETS / "tool_templates" / template).read_text()
    return tok


@pytest.fixture(scope="module")
def toks():
    return {
        "qwen": _tokenizer("qwen2_5.jinja", QWEN_SPLIT, eos="<|im_end|>",
                           added=["<tool_call>", "</tool_call>"]),
        "llama": _tokenizer("llama3_1.jinja", LLAMA3_SPLIT, eos="<|eot_id|>", bos="<|begin_of_text|>",
                            special=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                     "<|python_tag|>"]),
    }


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "name": "get_weather", "content": "sky=clear temp=22"}
ANSWER = {"role": "assistant", "content": "Clear and 22 degrees in Paris."}
TOOL_RECORD = {"tools": TOOLS, "messages": [SYSTEM, USER, CALL, RESULT, ANSWER]}

# The trained runs of TOOL_RECORD, decoded: the call turn and the answer turn, each with its
# end-of-turn token (the EOS of both tokenizers); the arguments string is rendered as JSON.
TRAINED = {
    "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
             '<|im_end|>\n', "Clear and 22 degrees in Paris.<|im_end|>\n"],
    "llama": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
              "Clear and 22 degrees in Paris.<|eot_id|>"],
}


def write(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def runs(tok, ids, mask):
    """The decoded runs of consecutive trained tokens."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append(tok.decode(ids[start:i]))
            start = None
    return out


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_tool_call_conversation_trains_assistant_turns_only(toks, tmp_path, name):
    tok = toks[name]
    (ex,) = load_examples(write(tmp_path, [TOOL_RECORD]), tok, kind="sft", max_length=1024).examples
    ids, mask = ex.input_ids.tolist(), ex.loss_mask
    assert runs(tok, ids, mask) == TRAINED[name]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    # The tool's schema reached the template, in the prompt; user text and tool result untrained.
    assert '"name": "get_weather"' in untrained and "Current weather in a city" in untrained
    assert "Weather in Paris?" in untrained and "sky=clear temp=22" in untrained
    assert "Be brief." in untrained
    assert ids.count(tok.bos_token_id) == (1 if name == "llama" else 0)


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_tool_turns_in_the_prompt_are_context_only(toks, tmp_path, name):
    # prompt/completion: the call in the prompt is context; only the completion is trained.
    record = {"tools": TOOLS, "prompt": [SYSTEM, USER, CALL, RESULT], "completion": [ANSWER]}
    (ex,) = load_examples(write(tmp_path, [record]), toks[name], kind="sft", max_length=1024).examples
    assert runs(toks[name], ex.input_ids.tolist(), ex.loss_mask) == TRAINED[name][1:]


def test_parallel_calls_and_consecutive_results(toks, tmp_path):
    call2 = {"role": "assistant", "content": "Checking both.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},  # no "type": fine
        {"name": "get_weather", "arguments": {"city": "Rome"}}]}  # no "function" wrapper: fine
    results = [{"role": "tool", "content": "Paris: rain"}, {"role": "tool", "content": "Rome: sun"}]
    record = {"tools": TOOLS, "messages": [USER, call2, *results, ANSWER]}
    path = write(tmp_path, [record])
    (ex,) = load_examples(path, toks["qwen"], kind="sft", max_length=1024).examples
    call_run, answer_run = runs(toks["qwen"], ex.input_ids.tolist(), ex.loss_mask)
    assert call_run.startswith("Checking both.\n<tool_call>") and call_run.count("<tool_call>") == 2
    assert '{"city": "Rome"}' in call_run and answer_run == TRAINED["qwen"][1]
    text = toks["qwen"].decode(ex.input_ids.tolist())
    assert "Paris: rain\n</tool_response>\n<tool_response>\nRome: sun" in text  # one user turn
    # Llama 3.1's template allows one call per turn: its refusal names the record (skippable).
    with pytest.raises(DataError, match=r"train.jsonl line 1: the chat template rejects this record: "
                                        r"This model only supports single tool-calls at once!"):
        load_examples(path, toks["llama"], kind="sft", max_length=1024)


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_preference_pairs_with_tools(toks, tmp_path, name):
    tok = toks[name]
    refusal = {"role": "assistant", "content": "I cannot check the weather."}
    record = {"tools": TOOLS, "prompt": [SYSTEM, USER], "chosen": [CALL, RESULT, ANSWER],
              "rejected": [refusal]}
    (pair,) = load_examples(write(tmp_path, [record]), tok, kind="dpo", max_length=1024).examples
    assert runs(tok, pair.chosen_ids.tolist(), pair.chosen_mask) == TRAINED[name]
    end = TRAINED[name][1][len(ANSWER["content"]):]
    assert runs(tok, pair.rejected_ids.tolist(), pair.rejected_mask) == [refusal["content"] + end]
    for ids in (pair.chosen_ids, pair.rejected_ids):  # both sides' prompts carry the tools
        assert "Current weather in a city" in tok.decode(ids.tolist())


def test_templates_without_tool_support_are_refused(tmp_path):
    # The shipped ChatML template renders neither tools nor tool calls: training on it would
    # teach the model empty replies. A set-up problem: raised even with skip_invalid.
    tok = AutoTokenizer.from_pretrained(ASSETS / "gpt2_chatml")
    plain = {"messages": [USER, ANSWER]}
    cases = [({**TOOL_RECORD}, "the record has 'tools' but the chat template ignores them"),
             ({"messages": [USER, CALL, RESULT, ANSWER]},
              "the chat template drops the tool calls of assistant turn 1 ('get_weather' is not in "
              "its tokens); use a template with tool support")]
    for record, message in cases:
        for skip in (False, True):
            with pytest.raises(ToolTemplateError) as err:
                load_examples(write(tmp_path, [plain, record]), tok, kind="sft", max_length=1024,
                              skip_invalid=skip)
            assert str(err.value).startswith(f"{tmp_path / 'train.jsonl'} line 2: {message}")


def test_content_parts_are_read_as_text(toks, tmp_path):
    parts = {"tools": TOOLS, "messages": [
        {**SYSTEM, "content": [{"type": "text", "text": "Be brief."}]},
        {**USER, "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        CALL, {**RESULT, "content": [{"type": "text", "text": "sky=clear temp=22"}]},
        {**ANSWER, "content": [{"type": "text", "text": ANSWER["content"]}]}]}
    a, b = load_examples(write(tmp_path, [TOOL_RECORD, parts]), toks["qwen"], kind="sft",
                         max_length=1024).examples
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image", "image": "cat.png"}]}, ANSWER]}
    with pytest.raises(DataError) as err:
        load_examples(write(tmp_path, [TOOL_RECORD, image]), toks["qwen"], kind="sft", max_length=1024)
    assert str(err.value) == (f"{tmp_path / 'train.jsonl'} line 2: field 'messages[0].content[1]' "
                              "is a part of type 'image': images, audio and video are not "
                              "supported, text parts only")
    assert err.value.field == "messages[0].content[1]"


def test_parquet_rows_with_tools_encode_like_json(toks, tmp_path):
    # Arrow gives every message every key (None where unused) and nested JSON often as text.
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"tools": json.dumps(TOOLS), "messages": [
        SYSTEM, USER, {**CALL, "content": None}, RESULT, ANSWER]}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "train.parquet")
    (a,) = load_examples(str(tmp_path / "train.parquet"), toks["llama"], kind="sft", max_length=1024).examples
    (b,) = load_examples(write(tmp_path, [TOOL_RECORD]), toks["llama"], kind="sft", max_length=1024).examples
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)


@pytest.mark.parametrize("record,message", [
    ({"messages": [USER, {"role": "assistant", "tool_calls": {"name": "f"}}, ANSWER]},
     "field 'messages[1].tool_calls' must be a list of tool calls, got an object"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: Paris}"}}]}, ANSWER]},
     "field 'messages[1].tool_calls[0].function.arguments' is a string but not valid JSON"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}, ANSWER]},
     "field 'messages[1].tool_calls[0].function.arguments' must be an object (or its JSON string), "
     "got a list"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, ANSWER]},
     "field 'messages[1].tool_calls[0].function.name' is missing"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"type": "retrieval"}]}, ANSWER]},
     "field 'messages[1].tool_calls[0]' must be a function call ({'type': 'function', 'function'"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "field 'messages[1].content' is empty"),
    ({"messages": [USER, {"role": "tool"}, ANSWER]}, "field 'messages[1].content' is missing"),
    ({"messages": [USER, ANSWER], "tools": {"name": "f"}},
     "field 'tools' must be a list of tool schemas (or its JSON string), got an object"),
    ({"messages": [USER, ANSWER], "tools": [{"type": "function", "function": {"description": "x"}}]},
     "field 'tools[0]' must be a tool schema that names its function"),
    ({"prompt": "2+2=", "completion": "4", "tools": TOOLS},
     "field 'tools' needs a conversational record (message lists), but this one is 'prompt_completion'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, ANSWER]},
     "field 'messages[0].content[0].text' must be a string, got null"),
    ({"prompt": [USER], "chosen": [RESULT, ANSWER, USER, ANSWER], "rejected": [ANSWER]},
     "field 'chosen[2].role' is 'user', but completion turns must be assistant turns (or tool results"),
])
def test_bad_tool_records_name_the_field(record, message):
    with pytest.raises(DataError) as err:
        parse_record(record, "data.jsonl line 3")
    assert str(err.value).startswith(f"data.jsonl line 3: {message}")


# --- nothing to train -------------------------------------------------------------------------
# No record reaches training with an all-zero loss mask: a prompt that fills max_length is
# dropped first, and a turn the template renders as no tokens is an error. An encoder that masks
# out every token of some records stands in for a template or truncation rule that would.


@pytest.fixture
def untrainable(monkeypatch):
    real = Encoder.sequence

    def sequence(self, prompt, completion, *args, **kwargs):
        ids, mask, prompt_len = real(self, prompt, completion, *args, **kwargs)
        return ids, ([0] * len(mask) if "untrainable" in str(completion) else mask), prompt_len

    monkeypatch.setattr(Encoder, "sequence", sequence)


def test_records_with_nothing_to_train_are_dropped(toks, tmp_path, untrainable):
    tok = toks["qwen"]
    bad = {"messages": [USER, {"role": "assistant", "content": "untrainable"}]}
    s = load_examples(write(tmp_path, [TOOL_RECORD, bad, TOOL_RECORD]), tok, kind="sft", max_length=1024)
    assert [e.index for e in s.examples] == [0, 2] and all(e.loss_mask.sum() for e in s.examples)
    record = parse_record(bad, "x")
    assert encode_record(Encoder(tok), record, 0, "x", max_length=1024)[:2] == (None, "no_trained_tokens")
    # A pair goes when either side has nothing to train.
    pair = parse_record({"prompt": [USER], "chosen": [ANSWER],
                         "rejected": [{"role": "assistant", "content": "untrainable"}]}, "x")
    assert encode_record(Encoder(tok), pair, 0, "x", max_length=1024)[:2] == (None, "no_trained_tokens")
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(write(tmp_path, [bad, bad]), tok, kind="sft", max_length=1024)
    summary = DataReport("x", num_records=3, num_examples=2, num_no_trained_tokens=1).summary()
    assert "0 dropped as too long, 1 dropped with no trained token, 0 invalid" in summary
    assert "no trained token" not in DataReport("x").summary()


def test_records_with_nothing_to_train_are_counted(toks, tmp_path, untrainable):
    bad = {"messages": [USER, {"role": "assistant", "content": "untrainable"}]}
    r = load_examples(write(tmp_path, [TOOL_RECORD, bad]), toks["qwen"], kind="sft", max_length=1024).report
    assert (r.num_records, r.num_examples, r.num_no_trained_tokens, r.num_dropped_too_long) == (2, 1, 1, 0)
