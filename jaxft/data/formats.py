"""Recognise and validate dataset records in TRL's formats (docs/data.md, "Data formats").

Formats, detected from a record's fields (or named explicitly with `fmt=`):

    text                              {"text": str}                                   (sft)
    prompt_completion                 {"prompt": str, "completion": str}              (sft)
    conversational                    {"messages": [msg, ...]}                        (sft)
    conversational_prompt_completion  {"prompt": [msg, ...], "completion": [msg, ...]} (sft)
    preference                        {"prompt": str, "chosen": str, "rejected": str} (dpo)
    conversational_preference         {"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}
    implicit_preference               {"chosen": [msg...], "rejected": [msg...]}       (dpo)

A message is {"role": "system" | "user" | "assistant" | "tool", "content": non-empty str}.
Content may also be a list of parts, as multimodal datasets write it: its text parts
([{"type": "text", "text": ...}]) are joined into one string; any other part (an image, audio)
is refused. Tool calling follows transformers / TRL:
* an assistant message may carry "tool_calls": [{"type": "function", "function": {"name": str,
  "arguments": object}}] (arguments may be given as a JSON string, and the "function" wrapper
  may be left out); its content may then be empty or absent;
* a "tool" message is a tool's result (its content may be empty); "name" and "tool_call_id"
  are kept;
* a conversational record may have "tools": a list of JSON schemas (or their JSON string) that
  the chat template receives.
Other message keys are ignored. Other record fields are ignored too, and a field whose value is
None counts as absent (Parquet files and `datasets` give every row every column). Conversations
must end with an assistant turn. In an implicit preference pair the prompt is the longest run of
leading messages that chosen and rejected share; it must be non-empty and what follows it must
be assistant turns (or tool results between them), as in a conversational pair's chosen and
rejected.

Every problem raises `DataError` with the record's coordinate and the field, e.g.
`data/train.jsonl line 812: field 'chosen' is empty`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxft import errors
from jaxft.errors import ConfigError

SFT_FORMATS = ("text", "prompt_completion", "conversational", "conversational_prompt_completion")
DPO_FORMATS = ("preference", "conversational_preference", "implicit_preference")
FORMATS_BY_KIND = {"sft": SFT_FORMATS, "dpo": DPO_FORMATS}
ALL_FORMATS = SFT_FORMATS + DPO_FORMATS
ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")  # what may follow the prompt of a preference pair

Messages = list[dict[str, Any]]  # {"role", "content": str} (+ "tool_calls" / "name" / "tool_call_id")


class DataError(errors.DataError):
    """A record or source that cannot be used, with where it is and what is wrong.

    str(err) is "LOCATION: MESSAGE"; `location`, `field` (or None) and `message` are kept
    apart for reports.
    """

    def __init__(self, location: str, message: str, *, field: str | None = None):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.field = field

    def __reduce__(self):  # picklable (tokeniser worker processes send these back)
        return type(self), (self.location, self.message), {"field": self.field}


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record in one normal form.

    format: one of ALL_FORMATS.
    text: the document of a `text` record, else None.
    prompt: str for string formats; a message list for conversational ones (empty for
        `conversational`, whose messages all sit in `completion`; for implicit_preference
        the extracted shared prefix).
    completion: SFT completion (str or messages), else None.
    chosen / rejected: preference completions (str or messages, after the prompt), else None.
    tools: the JSON schemas a conversational record's chat template receives, else None.
    """
    format: str
    text: str | None = None
    prompt: str | Messages | None = None
    completion: str | Messages | None = None
    chosen: str | Messages | None = None
    rejected: str | Messages | None = None
    tools: list[dict] | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def detect_format(record: Any, location: str) -> str:
    """The TRL format of `record`, from which fields it has (see the module docstring)."""
    _require_object(record, location)
    has = {k for k, v in record.items() if v is not None}
    if "chosen" in has or "rejected" in has:
        if "prompt" not in has:
            return "implicit_preference"
        conversational = _str_or_list(record, "prompt", location)
        return "conversational_preference" if conversational else "preference"
    if "messages" in has:
        return "conversational"
    if "prompt" in has or "completion" in has:
        conversational = _str_or_list(record, "prompt" if "prompt" in has else "completion", location)
        return "conversational_prompt_completion" if conversational else "prompt_completion"
    if "text" in has:
        return "text"
    fields = ", ".join(repr(k) for k in record) or "none"
    raise DataError(location, f"record matches no known format (its fields: {fields}); expected "
                              "'text', 'prompt'+'completion', 'messages', "
                              "'prompt'+'chosen'+'rejected' or 'chosen'+'rejected'")


def _str_or_list(record: dict, field: str, location: str) -> bool:
    """Whether `field` (which decides string vs conversational) is a list; else a string."""
    value = record[field]
    if not isinstance(value, (str, list)):
        raise DataError(location, f"field {field!r} must be a string or a list of messages, "
                                  f"got {_type_name(value)}", field=field)
    return isinstance(value, list)


def check_kind(fmt: str, kind: str, location: str) -> None:
    """DataError if records of format `fmt` cannot train a `kind` ("sft" / "dpo") model."""
    accepted = formats_for_kind(kind)
    if fmt not in accepted:
        other = "dpo" if kind == "sft" else "sft"
        raise DataError(location, f"a {fmt!r} record cannot be used for {kind}; {kind} accepts "
                                  f"{', '.join(accepted)} (is this {other} data?)")


def formats_for_kind(kind: str) -> tuple[str, ...]:
    """The formats a command accepts; ValueError for an unknown kind."""
    if kind not in FORMATS_BY_KIND:
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
    return FORMATS_BY_KIND[kind]


def parse_record(record: Any, location: str, fmt: str = "auto") -> Record:
    """Validate `record` as format `fmt` ("auto" detects it) and return its normal form.

    Raises:
      DataError: naming `location` and the offending field.
      ValueError: `fmt` is not "auto" or a known format name.
    """
    if fmt == "auto":
        fmt = detect_format(record, location)
    elif fmt not in ALL_FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; use 'auto' or one of {', '.join(ALL_FORMATS)}")
    _require_object(record, location)
    parsed = _PARSERS[fmt](record, location)
    tools = _tools(record, location)
    if tools is None:
        return parsed
    if not parsed.conversational:
        raise DataError(location, f"field 'tools' needs a conversational record (message lists), "
                                  f"but this one is {fmt!r}", field="tools")
    return dataclasses.replace(parsed, tools=tools)


def _require_object(record: Any, location: str) -> None:
    if not isinstance(record, dict):
        raise DataError(location, "a record must be a JSON object (dict) with named fields, "
                                  f"got {_type_name(record)}")


def _type_name(value: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _string(record: dict, field: str, location: str, name: str | None = None) -> str:
    """record[field], a non-empty string; `name` is what errors call it (default: field)."""
    name = name or field
    value = record.get(field)
    if value is None:
        raise DataError(location, f"field {name!r} is missing", field=name)
    return _nonempty_str(value, name, location, "a string")


def _nonempty_str(value: Any, field: str, location: str, expected: str) -> str:
    if not isinstance(value, str):
        raise DataError(location, f"field {field!r} must be {expected}, got {_type_name(value)}",
                        field=field)
    if not value.strip():
        raise DataError(location, f"field {field!r} is empty", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" JSON escape
        raise DataError(location, f"field {field!r} is not valid Unicode (unpaired surrogate)",
                        field=field) from None
    return value


def _messages(record: dict, field: str, location: str, *, end_with_assistant: bool = True,
              only_assistant: bool = False) -> Messages:
    """A validated list of messages (see `_message`); only_assistant: assistant turns and the
    tool results between them only."""
    value = record.get(field)
    if value is None:
        raise DataError(location, f"field {field!r} is missing", field=field)
    if not isinstance(value, list):
        raise DataError(location, f"field {field!r} must be a list of messages "
                                  f"({{'role', 'content'}}), got {_type_name(value)}", field=field)
    if not value:
        raise DataError(location, f"field {field!r} is empty", field=field)
    out = []
    for i, msg in enumerate(value):
        name = f"{field}[{i}]"
        out.append(_message(msg, name, location))
        if only_assistant and out[-1]["role"] not in COMPLETION_ROLES:
            raise DataError(location, f"field '{name}.role' is {out[-1]['role']!r}, but completion "
                                      "turns must be assistant turns (or tool results between "
                                      "them)", field=f"{name}.role")
    if end_with_assistant and out[-1]["role"] != "assistant":
        raise DataError(location, f"field {field!r} must end with an assistant turn (the last "
                                  f"message is {out[-1]['role']!r})", field=field)
    return out


def _bad(location: str, field: str, problem: str) -> DataError:
    return DataError(location, f"field {field!r} {problem}", field=field)


def _message(msg: Any, name: str, location: str) -> dict:
    """One validated message: {"role", "content": str}, plus "tool_calls" (assistant) or
    "name" / "tool_call_id" (tool) when given; other keys dropped."""
    if not isinstance(msg, dict):
        raise _bad(location, name, f"must be a message object with 'role' and 'content', got "
                                   f"{_type_name(msg)}")
    role = _string(msg, "role", location, f"{name}.role")
    if role not in ROLES:
        raise _bad(location, f"{name}.role", f"is {role!r}; expected one of {', '.join(ROLES)}")
    calls = _tool_calls(msg.get("tool_calls"), f"{name}.tool_calls", location) if role == "assistant" else None
    if msg.get("content") is None and not calls:
        raise _bad(location, f"{name}.content", "is missing")
    # A tool-call turn may say nothing besides its calls; a tool may return an empty result.
    out = {"role": role, "content": _content(msg.get("content"), f"{name}.content", location,
                                             may_be_empty=bool(calls) or role == "tool")}
    if calls:
        out["tool_calls"] = calls
    for key in ("name", "tool_call_id") if role == "tool" else ():
        if msg.get(key) is not None:
            out[key] = _string(msg, key, location, f"{name}.{key}")
    return out


def _content(value: Any, field: str, location: str, may_be_empty: bool) -> str:
    """A message's content as one string: a string, or its text parts joined (multimodal
    datasets write [{"type": "text", "text": ...}, ...])."""
    if isinstance(value, list):
        for j, part in enumerate(value):
            kind = part.get("type", "text" if "text" in part else None) if isinstance(part, dict) else None
            if kind != "text":
                raise _bad(location, f"{field}[{j}]", f"is a part of type {kind!r}: images, audio "
                                                      "and video are not supported, text parts only"
                           if kind else "must be a text part ({'type': 'text', 'text': ...})")
            if not isinstance(part.get("text"), str):
                raise _bad(location, f"{field}[{j}].text", f"must be a string, got {_type_name(part.get('text'))}")
        value = "".join(part["text"] for part in value)
    if may_be_empty and (value is None or isinstance(value, str) and not value.strip()):
        return value or ""
    return _nonempty_str(value, field, location, "a string (or a list of text parts)")


def _tool_calls(value: Any, field: str, location: str) -> list[dict] | None:
    """An assistant message's tool calls in transformers' form, [{"type": "function",
    "function": {"name": str, "arguments": dict}} (+ "id")]; None when there are none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(location, field, f"must be a list of tool calls, got {_type_name(value)}")
    out = []
    for j, call in enumerate(value):
        name = f"{field}[{j}]"
        if not isinstance(call, dict) or call.get("type") not in (None, "function"):
            raise _bad(location, name, "must be a function call ({'type': 'function', 'function': "
                                       "{'name': ..., 'arguments': {...}}})")
        # {"name", "arguments"} without the "function" wrapper is accepted too.
        fn, where = (call["function"], f"{name}.function") if call.get("function") is not None else (call, name)
        if not isinstance(fn, dict):
            raise _bad(location, where, f"must be an object with 'name' and 'arguments', got {_type_name(fn)}")
        # Templates write `arguments | tojson`: a JSON string would be quoted a second time.
        args = _json_value(fn.get("arguments"), f"{where}.arguments", location)
        if not isinstance(args, (dict, type(None))):
            raise _bad(location, f"{where}.arguments", "must be an object (or its JSON string), got "
                                                       f"{_type_name(args)}")
        function = {"name": _string(fn, "name", location, f"{where}.name"), "arguments": args or {}}
        out.append({"type": "function", "function": function,
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return out or None


def _tools(record: dict, location: str) -> list[dict] | None:
    """The record's tool schemas for the chat template (None when absent or empty); each must
    name its function: {"type": "function", "function": {"name", ...}} or {"name", ...}."""
    tools = _json_value(record.get("tools"), "tools", location)
    if tools is not None and not isinstance(tools, list):
        raise _bad(location, "tools", f"must be a list of tool schemas (or its JSON string), got "
                                      f"{_type_name(tools)}")
    for j, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise _bad(location, f"tools[{j}]", "must be a tool schema that names its function "
                                                "({'type': 'function', 'function': {'name': ..., "
                                                "'parameters': ...}})")
    return tools or None


def _json_value(value: Any, field: str, location: str) -> Any:
    """`value`, or what it decodes to when it is a string (Arrow / Parquet columns often hold
    nested JSON as text)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise _bad(location, field, f"is a string but not valid JSON ({err.msg}, column {err.colno})") from None


def _text(r: dict, loc: str) -> Record:
    return Record("text", text=_string(r, "text", loc))


def _prompt_completion(r: dict, loc: str) -> Record:
    return Record("prompt_completion", prompt=_string(r, "prompt", loc),
                  completion=_string(r, "completion", loc))


def _conversational(r: dict, loc: str) -> Record:
    messages = _messages(r, "messages", loc)
    if messages[0]["role"] == "assistant":
        raise DataError(loc, "field 'messages' starts with an assistant turn; it needs a user "
                             "(or system) turn before", field="messages")
    return Record("conversational", prompt=[], completion=messages)


def _conversational_prompt_completion(r: dict, loc: str) -> Record:
    return Record("conversational_prompt_completion",
                  prompt=_messages(r, "prompt", loc, end_with_assistant=False),
                  completion=_messages(r, "completion", loc))


def _pair_differs(chosen, rejected, loc: str) -> None:
    if chosen == rejected:
        raise DataError(loc, "fields 'chosen' and 'rejected' are identical", field="chosen")


def _preference(r: dict, loc: str) -> Record:
    prompt = _string(r, "prompt", loc)
    chosen, rejected = _string(r, "chosen", loc), _string(r, "rejected", loc)
    _pair_differs(chosen, rejected, loc)
    return Record("preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _conversational_preference(r: dict, loc: str) -> Record:
    prompt = _messages(r, "prompt", loc, end_with_assistant=False)
    chosen = _messages(r, "chosen", loc, only_assistant=True)
    rejected = _messages(r, "rejected", loc, only_assistant=True)
    _pair_differs(chosen, rejected, loc)
    return Record("conversational_preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _implicit_preference(r: dict, loc: str) -> Record:
    for field in ("chosen", "rejected"):
        if isinstance(r.get(field), str):
            raise DataError(loc, f"field {field!r} is a string but there is no 'prompt' field; "
                                 "string pairs need a 'prompt', message lists may share a "
                                 "leading prefix instead", field=field)
    chosen = _messages(r, "chosen", loc)
    rejected = _messages(r, "rejected", loc)
    _pair_differs(chosen, rejected, loc)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(loc, "fields 'chosen' and 'rejected' share no leading messages, so there "
                             "is no implicit prompt; add a 'prompt' field", field="chosen")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if n == len(messages):
            raise DataError(loc, f"field {field!r} has no messages after the prompt it shares "
                                 "with the other field", field=field)
        for i in range(n, len(messages)):
            if messages[i]["role"] not in COMPLETION_ROLES:
                raise DataError(loc, f"field '{field}[{i}].role' is {messages[i]['role']!r}; after "
                                     "the shared prompt only assistant turns (and tool results "
                                     "between them) may follow", field=f"{field}[{i}].role")
    return Record("implicit_preference", prompt=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])


_PARSERS = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "conversational": _conversational,
    "conversational_prompt_completion": _conversational_prompt_completion,
    "preference": _preference,
    "conversational_preference": _conversational_preference,
    "implicit_preference": _implicit_preference,
}
