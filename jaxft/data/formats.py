"""Recognise and validate dataset records in TRL's formats (README.md, "Data formats").

Formats, detected from a record's fields (or named explicitly with `fmt=`):

    text                              {"text": str}                                   (sft)
    prompt_completion                 {"prompt": str, "completion": str}              (sft)
    conversational                    {"messages": [msg, ...]}                        (sft)
    conversational_prompt_completion  {"prompt": [msg, ...], "completion": [msg, ...]} (sft)
    preference                        {"prompt": str, "chosen": str, "rejected": str} (dpo)
    conversational_preference         {"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}
    implicit_preference               {"chosen": [msg...], "rejected": [msg...]}       (dpo)

A message is {"role": "system" | "user" | "assistant", "content": non-empty str}; other keys
are ignored. Other record fields are ignored too, and a field whose value is None counts as
absent (Parquet files and `datasets` give every row every column). Conversations must end with
an assistant turn. In an implicit preference pair the prompt is the longest run of leading
messages that chosen and rejected share; it must be non-empty and what follows it must be
assistant turns.

Every problem raises `DataError` with the record's coordinate and the field, e.g.
`data/train.jsonl line 812: field 'chosen' is empty`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SFT_FORMATS = ("text", "prompt_completion", "conversational", "conversational_prompt_completion")
DPO_FORMATS = ("preference", "conversational_preference", "implicit_preference")
FORMATS_BY_KIND = {"sft": SFT_FORMATS, "dpo": DPO_FORMATS}
ALL_FORMATS = SFT_FORMATS + DPO_FORMATS
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A record or source that cannot be used, with where it is and what is wrong.

    str(err) is "LOCATION: MESSAGE"; `location`, `field` (or None) and `message` are kept
    apart for reports.
    """

    def __init__(self, location: str, message: str, *, field: str | None = None):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.field = field


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
    """
    format: str
    text: str | None = None
    prompt: str | Messages | None = None
    completion: str | Messages | None = None
    chosen: str | Messages | None = None
    rejected: str | Messages | None = None

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
        raise ValueError(f"unknown data format {fmt!r}; use 'auto' or one of {', '.join(ALL_FORMATS)}")
    _require_object(record, location)
    return _PARSERS[fmt](record, location)


def _require_object(record: Any, location: str) -> None:
    if not isinstance(record, dict):
        raise DataError(location, "a record must be a JSON object (dict) with named fields, "
                                  f"got {_type_name(record)}")


def _type_name(value: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _string(record: dict, field: str, location: str) -> str:
    value = record.get(field)
    if value is None:
        raise DataError(location, f"field {field!r} is missing", field=field)
    return _nonempty_str(value, field, location, "a string")


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
    """A validated list of {"role", "content"} dicts (other keys dropped)."""
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
        if not isinstance(msg, dict):
            raise DataError(location, f"field {name!r} must be a message object with 'role' and "
                                      f"'content', got {_type_name(msg)}", field=name)
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise DataError(location, f"field '{name}.{key}' is missing", field=f"{name}.{key}")
        role = _nonempty_str(msg["role"], f"{name}.role", location, "a string")
        if role not in ROLES:
            raise DataError(location, f"field '{name}.role' is {role!r}; expected one of "
                                      f"{', '.join(ROLES)}", field=f"{name}.role")
        if only_assistant and role != "assistant":
            raise DataError(location, f"field '{name}.role' is {role!r}, but completion turns "
                                      "must be assistant turns", field=f"{name}.role")
        content = _nonempty_str(msg["content"], f"{name}.content", location, "a string")
        out.append({"role": role, "content": content})
    if end_with_assistant and out[-1]["role"] != "assistant":
        raise DataError(location, f"field {field!r} must end with an assistant turn (the last "
                                  f"message is {out[-1]['role']!r})", field=field)
    return out


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
            if messages[i]["role"] != "assistant":
                raise DataError(loc, f"field '{field}[{i}].role' is {messages[i]['role']!r}; after "
                                     "the shared prompt only assistant turns may follow",
                                field=f"{field}[{i}].role")
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
