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
from typing import Any

from jaxft.data.data_error import DataError
from jaxft.data.fields import COMPLETION_ROLES, Messages, message_list, string_field, tool_schemas, type_name
from jaxft.errors import ConfigError

SFT_FORMATS = ("text", "prompt_completion", "conversational", "conversational_prompt_completion")
DPO_FORMATS = ("preference", "conversational_preference", "implicit_preference")
FORMATS_BY_KIND = {"sft": SFT_FORMATS, "dpo": DPO_FORMATS}
ALL_FORMATS = SFT_FORMATS + DPO_FORMATS


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
                                  f"got {type_name(value)}", field=field)
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
    tools = tool_schemas(record, location)
    if tools is None:
        return parsed
    if not parsed.conversational:
        raise DataError(location, f"field 'tools' needs a conversational record (message lists), "
                                  f"but this one is {fmt!r}", field="tools")
    return dataclasses.replace(parsed, tools=tools)


def _require_object(record: Any, location: str) -> None:
    if not isinstance(record, dict):
        raise DataError(location, "a record must be a JSON object (dict) with named fields, "
                                  f"got {type_name(record)}")


def _text(r: dict, loc: str) -> Record:
    return Record("text", text=string_field(r, "text", loc))


def _prompt_completion(r: dict, loc: str) -> Record:
    return Record("prompt_completion", prompt=string_field(r, "prompt", loc),
                  completion=string_field(r, "completion", loc))


def _conversational(r: dict, loc: str) -> Record:
    messages = message_list(r, "messages", loc)
    if messages[0]["role"] == "assistant":
        raise DataError(loc, "field 'messages' starts with an assistant turn; it needs a user "
                             "(or system) turn before", field="messages")
    return Record("conversational", prompt=[], completion=messages)


def _conversational_prompt_completion(r: dict, loc: str) -> Record:
    return Record("conversational_prompt_completion",
                  prompt=message_list(r, "prompt", loc, end_with_assistant=False),
                  completion=message_list(r, "completion", loc))


def _pair_differs(chosen, rejected, loc: str) -> None:
    if chosen == rejected:
        raise DataError(loc, "fields 'chosen' and 'rejected' are identical", field="chosen")


def _preference(r: dict, loc: str) -> Record:
    prompt = string_field(r, "prompt", loc)
    chosen, rejected = string_field(r, "chosen", loc), string_field(r, "rejected", loc)
    _pair_differs(chosen, rejected, loc)
    return Record("preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _conversational_preference(r: dict, loc: str) -> Record:
    prompt = message_list(r, "prompt", loc, end_with_assistant=False)
    chosen = message_list(r, "chosen", loc, only_assistant=True)
    rejected = message_list(r, "rejected", loc, only_assistant=True)
    _pair_differs(chosen, rejected, loc)
    return Record("conversational_preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _implicit_preference(r: dict, loc: str) -> Record:
    for field in ("chosen", "rejected"):
        if isinstance(r.get(field), str):
            raise DataError(loc, f"field {field!r} is a string but there is no 'prompt' field; "
                                 "string pairs need a 'prompt', message lists may share a "
                                 "leading prefix instead", field=field)
    chosen = message_list(r, "chosen", loc)
    rejected = message_list(r, "rejected", loc)
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
