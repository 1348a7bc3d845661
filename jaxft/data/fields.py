"""The values of a record's fields, validated one field at a time (formats.py picks the fields).

Non-empty UTF-8 strings, message lists (`{"role", "content"}` dicts, with content given as
text parts, an assistant's "tool_calls", a tool result's "name" / "tool_call_id"), and a
record's "tools" schemas; nested values may come as JSON text (Arrow / Parquet columns).
Each problem is a `DataError` naming the record and the field, e.g. `messages[2].role`.
"""

from __future__ import annotations

import json
from typing import Any

from jaxft.data.data_error import DataError

ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")  # what may follow the prompt of a preference pair

Messages = list[dict[str, Any]]  # {"role", "content": str} (+ "tool_calls" / "name" / "tool_call_id")


def type_name(value: Any) -> str:
    """How an error names a JSON value's type: "a string", "a list", "an object", "null", ..."""
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def string_field(record: dict, field: str, location: str, name: str | None = None) -> str:
    """record[field], a non-empty string; `name` is what errors call it (default: field)."""
    name = name or field
    value = record.get(field)
    if value is None:
        raise DataError(location, f"field {name!r} is missing", field=name)
    return _nonempty_str(value, name, location, "a string")


def _nonempty_str(value: Any, field: str, location: str, expected: str) -> str:
    if not isinstance(value, str):
        raise DataError(location, f"field {field!r} must be {expected}, got {type_name(value)}",
                        field=field)
    if not value.strip():
        raise DataError(location, f"field {field!r} is empty", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" JSON escape
        raise DataError(location, f"field {field!r} is not valid Unicode (unpaired surrogate)",
                        field=field) from None
    return value


def message_list(record: dict, field: str, location: str, *, end_with_assistant: bool = True,
              only_assistant: bool = False) -> Messages:
    """A validated list of messages (see `_message`); only_assistant: assistant turns and the
    tool results between them only."""
    value = record.get(field)
    if value is None:
        raise DataError(location, f"field {field!r} is missing", field=field)
    if not isinstance(value, list):
        raise DataError(location, f"field {field!r} must be a list of messages "
                                  f"({{'role', 'content'}}), got {type_name(value)}", field=field)
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


def bad_field(location: str, field: str, problem: str) -> DataError:
    """DataError "LOCATION: field 'FIELD' PROBLEM", naming the field."""
    return DataError(location, f"field {field!r} {problem}", field=field)


def _message(msg: Any, name: str, location: str) -> dict:
    """One validated message: {"role", "content": str}, plus "tool_calls" (assistant) or
    "name" / "tool_call_id" (tool) when given; other keys dropped."""
    if not isinstance(msg, dict):
        raise bad_field(location, name, f"must be a message object with 'role' and 'content', got "
                                   f"{type_name(msg)}")
    role = string_field(msg, "role", location, f"{name}.role")
    if role not in ROLES:
        raise bad_field(location, f"{name}.role", f"is {role!r}; expected one of {', '.join(ROLES)}")
    calls = _tool_calls(msg.get("tool_calls"), f"{name}.tool_calls", location) if role == "assistant" else None
    if msg.get("content") is None and not calls:
        raise bad_field(location, f"{name}.content", "is missing")
    # A tool-call turn may say nothing besides its calls; a tool may return an empty result.
    out = {"role": role, "content": _content(msg.get("content"), f"{name}.content", location,
                                             may_be_empty=bool(calls) or role == "tool")}
    if calls:
        out["tool_calls"] = calls
    for key in ("name", "tool_call_id") if role == "tool" else ():
        if msg.get(key) is not None:
            out[key] = string_field(msg, key, location, f"{name}.{key}")
    return out


def _content(value: Any, field: str, location: str, may_be_empty: bool) -> str:
    """A message's content as one string: a string, or its text parts joined (multimodal
    datasets write [{"type": "text", "text": ...}, ...])."""
    if isinstance(value, list):
        for j, part in enumerate(value):
            kind = part.get("type", "text" if "text" in part else None) if isinstance(part, dict) else None
            if kind != "text":
                raise bad_field(location, f"{field}[{j}]", f"is a part of type {kind!r}: images, audio "
                                                      "and video are not supported, text parts only"
                           if kind else "must be a text part ({'type': 'text', 'text': ...})")
            if not isinstance(part.get("text"), str):
                raise bad_field(location, f"{field}[{j}].text", f"must be a string, got {type_name(part.get('text'))}")
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
        raise bad_field(location, field, f"must be a list of tool calls, got {type_name(value)}")
    out = []
    for j, call in enumerate(value):
        name = f"{field}[{j}]"
        if not isinstance(call, dict) or call.get("type") not in (None, "function"):
            raise bad_field(location, name, "must be a function call ({'type': 'function', 'function': "
                                       "{'name': ..., 'arguments': {...}}})")
        # {"name", "arguments"} without the "function" wrapper is accepted too.
        fn, where = (call["function"], f"{name}.function") if call.get("function") is not None else (call, name)
        if not isinstance(fn, dict):
            raise bad_field(location, where, f"must be an object with 'name' and 'arguments', got {type_name(fn)}")
        # Templates write `arguments | tojson`: a JSON string would be quoted a second time.
        args = _json_value(fn.get("arguments"), f"{where}.arguments", location)
        if not isinstance(args, (dict, type(None))):
            raise bad_field(location, f"{where}.arguments", "must be an object (or its JSON string), got "
                                                       f"{type_name(args)}")
        function = {"name": string_field(fn, "name", location, f"{where}.name"), "arguments": args or {}}
        out.append({"type": "function", "function": function,
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return out or None


def tool_schemas(record: dict, location: str) -> list[dict] | None:
    """The record's tool schemas for the chat template (None when absent or empty); each must
    name its function: {"type": "function", "function": {"name", ...}} or {"name", ...}."""
    tools = _json_value(record.get("tools"), "tools", location)
    if tools is not None and not isinstance(tools, list):
        raise bad_field(location, "tools", f"must be a list of tool schemas (or its JSON string), got "
                                      f"{type_name(tools)}")
    for j, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise bad_field(location, f"tools[{j}]", "must be a tool schema that names its function "
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
        raise bad_field(location, field, f"is a string but not valid JSON ({err.msg}, column {err.colno})") from None
