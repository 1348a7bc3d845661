"""One record's tokens: the `Encoder` (plain text and chat templates, assistant spans, EOS), `fit`
to max_length, and `encode_record` / `process_record` giving an SFTExample or PreferenceExample.

Token convention (docs/data.md, "Data formats"):
* String records: `prompt_ids = tok(prompt)` with the tokenizer's leading special tokens (BOS
  if it adds one; never a trailing EOS some tokenizers append), `completion_ids =
  tok(completion, add_special_tokens=False) + [eos]`; the loss is on the completion.
  `text` records: `tok(text) + [eos]`, loss on every token but the first.
* Conversational records use the tokenizer's chat template. The rendered string is tokenized
  without special tokens, and the tokenizer's BOS is put in front unless the template wrote it:
  exactly one BOS when the tokenizer uses one. Assistant tokens are found by rendering
  prefixes, so templates without `{% generation %}` tags work: turn i spans the tokens between
  `render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`, both of which
  must be token prefixes of the full rendering (else DataError). A span holds everything the
  template writes after the generation prompt up to the next turn: the content, the
  end-of-turn token (`</s>`, `<|im_end|>`, Gemma's `<end_of_turn>`) and what follows it
  (ChatML's "\\n"). Some templates close a whole conversation with special tokens they never
  write between turns (Phi-3 writes its EOS after the last turn): an earlier turn's rendering
  may end in such a run of special tokens when the whole conversation ends in the same run;
  the turn's span stops before it. If the last assistant span holds no EOS (ChatML ends turns
  with `<|im_end|>`), one EOS is appended and trained, so every example teaches the stop the
  generator uses; an EOS is never doubled.
  All assistant turns are trained (for prompt/completion records, those in the completion).
* `completion_only_loss=False` trains every token but the first (SFT only; DPO always sums
  the completion).
* EOS is never doubled: a completion whose text already ends in the EOS token gets no second.

Truncation (`max_length`, `truncation=`):
* "truncate_completion" (default): the prompt is kept whole and the sequence is cut to
  max_length tokens. The EOS goes with the cut (as TRL does): a kept EOS would teach the model
  to stop mid-sentence, a missing one only means this example does not teach stopping.
  In a conversation the prompt is everything before the first trained assistant turn; later
  turns are cut like a completion. A DPO pair cuts chosen and rejected separately, each to
  max_length.
* "drop": an example (a pair: either sequence) longer than max_length is dropped.
In both modes an example whose prompt alone takes max_length tokens (no room for one
completion token) is dropped and counted; it is never trained with an empty completion.
"""

from __future__ import annotations

import numpy as np

from jaxft.data.batch import PreferenceExample, SFTExample
from jaxft.data.data_error import DataError
from jaxft.data.formats import Record, check_kind, parse_record
from jaxft.errors import ConfigError


class NoChatTemplateError(DataError):
    """A conversational record met a tokenizer without a chat template: a set-up problem,
    raised even with skip_invalid (skipping would silently drop every such record)."""


class ToolTemplateError(NoChatTemplateError):
    """A record with tools or tool calls met a chat template that drops them: like a missing
    template, a set-up problem, raised even with skip_invalid (else every such record would be
    skipped, or trained on a conversation the model never sees at inference)."""


class Encoder:
    """Tokenizes validated Records with one tokenizer (see the module docstring).

    Tool calling (as TRL): a record's `tools` go to every rendering of its conversation; an
    assistant turn is trained whether it answers or calls tools; tool results, like user and
    system turns, are not. A template that ignores the tools or drops the tool calls raises
    ToolTemplateError.

    Args:
      tokenizer: a `transformers` tokenizer with an EOS token.
      chat_template: overrides the tokenizer's chat template (Jinja source), optional.
    """

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no eos_token; set one (examples must end with it)")
        # None lets apply_chat_template pick the tokenizer's own (which may be a dict of
        # named templates); has_template is what decides whether chat records can be encoded.
        self.chat_template = chat_template or None
        self.has_template = bool(chat_template or getattr(tokenizer, "chat_template", None))
        # The special tokens the tokenizer puts before text (usually [BOS] or nothing).
        plain = self.encode("a")
        full = tokenizer("a")["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1)
                      if full[i:i + len(plain)] == plain), 0)
        self.prefix = list(full[:start])
        # Special tokens, named (bos, eos, ...) or added as special (chat markers).
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens added."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def sequence(self, prompt: str | list, completion: str | list, location: str,
                 completion_only: bool = True,
                 tools: list[dict] | None = None) -> tuple[list[int], list[int], int]:
        """(ids, mask, prompt_len) of one prompt + completion; prompt_len = tokens before the
        first completion token (those must fit in max_length). tools: JSON schemas for the
        chat template (conversations only)."""
        if isinstance(prompt, list):
            ids, mask, prompt_len = self._chat(prompt, completion, location, tools)
        else:
            p = self.prefix + self.encode(prompt)
            c = self._with_eos(self.encode(completion))
            ids, mask, prompt_len = p + c, [0] * len(p) + [1] * len(c), len(p)
        if not completion_only:
            mask = [0] + [1] * (len(ids) - 1)
        return ids, mask, prompt_len

    def prompt(self, prompt: str | list, location: str, tools: list[dict] | None = None) -> list[int]:
        """The token ids `sequence` gives a prompt (the tokens before its completion): a string
        with the tokenizer's leading special tokens, messages under the chat template with the
        generation prompt. What a sampler continues (online DPO)."""
        if isinstance(prompt, list):
            if not self.has_template:
                raise NoChatTemplateError(
                    location, "this record is conversational but the tokenizer has no chat template; "
                              "use a tokenizer that has one (model.tokenizer) or set data.chat_template")
            return self._render(prompt, True, location, tools)
        return self.prefix + self.encode(prompt)

    def text(self, text: str) -> tuple[list[int], list[int], int]:
        ids = self._with_eos(self.prefix + self.encode(text))
        return ids, [0] + [1] * (len(ids) - 1), 1

    def _render(self, messages: list, generation_prompt: bool, location: str,
                tools: list[dict] | None = None) -> list[int]:
        import jinja2

        try:
            text = self.tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=self.chat_template)
        # raise_exception() in a template is a TemplateError; templates indexing or adding
        # things the record lacks fail with the others.
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as err:
            raise DataError(location, f"the chat template rejects this record: {err}") from None
        ids = self.encode(text)
        if self.prefix and ids[:len(self.prefix)] != self.prefix:
            ids = self.prefix + ids  # the template did not write BOS itself
        return ids

    def _chat(self, prompt: list, completion: list, location: str, tools: list[dict] | None = None):
        if not self.has_template:
            raise NoChatTemplateError(
                location, "this record is conversational but the tokenizer has no chat template; "
                          "use a tokenizer that has one (model.tokenizer) or set data.chat_template")
        messages = prompt + completion
        full = self._render(messages, False, location, tools)
        if tools and full == self._render(messages, False, location):
            raise ToolTemplateError(location, "the record has 'tools' but the chat template ignores "
                                              "them; use a template with tool support "
                                              "(data.chat_template)", field="tools")
        mask = [0] * len(full)
        prompt_len, last_span = None, []
        for i in range(len(prompt), len(messages)):
            if messages[i]["role"] != "assistant":  # user, system and tool turns are not trained
                continue
            before = self._render(messages[:i], True, location, tools)
            upto = full if i == len(messages) - 1 else self._without_conversation_end(
                self._render(messages[:i + 1], False, location, tools), full)
            for n, part in ((i, before), (i + 1, upto)):
                if full[:len(part)] != part:
                    raise DataError(location, f"the chat template renders the first {n} messages "
                                              "differently from the start of the whole conversation "
                                              "(not a token prefix), so assistant tokens cannot be "
                                              "located", field="messages")
            if len(upto) <= len(before):
                raise DataError(location, f"the chat template renders assistant turn {i} as no tokens")
            mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
            last_span = upto[len(before):]
            self._check_tool_calls(messages[i], i, last_span, location)
            if prompt_len is None:
                prompt_len = len(before)
        if prompt_len is None:  # validation requires a final assistant turn; be explicit anyway
            raise DataError(location, "the conversation has no assistant turn to train on")
        # The last trained turn must teach stopping with the EOS the generator stops at; it may
        # be followed by template whitespace (then it is already there and not added again).
        if self.eos not in last_span:
            full, mask = full + [self.eos], mask + [1]
        return full, mask, prompt_len

    def _without_conversation_end(self, part: list[int], full: list[int]) -> list[int]:
        """`part` (the rendering of the first turns) less a trailing run of special tokens that
        stands where `full` goes on with the next turn and that `full` ends with too: what the
        template writes only at the end of a conversation (Phi-3's EOS). Else `part` as it is
        (a rendering that differs otherwise is refused by the prefix check)."""
        k = next((j for j, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
        tail = part[k:]
        if tail and full[-len(tail):] == tail and all(t in self.special_ids for t in tail):
            return part[:k]
        return part

    def _check_tool_calls(self, message: dict, i: int, span: list[int], location: str) -> None:
        """ToolTemplateError unless the tokens of assistant turn i name each function it calls
        (a template without tool support renders a tool-call turn as an empty reply)."""
        if "tool_calls" not in message:
            return
        text = self.tok.decode(span)
        for call in message["tool_calls"]:
            name = call["function"]["name"]
            if name not in text:
                raise ToolTemplateError(location, f"the chat template drops the tool calls of "
                                                  f"assistant turn {i} ({name!r} is not in its "
                                                  "tokens); use a template with tool support "
                                                  "(data.chat_template)", field="messages")


def fit(ids: list[int], mask: list[int], prompt_len: int, max_length: int, truncation: str):
    """(ids, mask, status) with status "ok" | "truncated" | "too_long" | "prompt_too_long"."""
    if len(ids) <= max_length:
        return ids, mask, "ok"
    if prompt_len >= max_length:
        return ids, mask, "prompt_too_long"
    if truncation == "drop":
        return ids, mask, "too_long"
    return ids[:max_length], mask[:max_length], "truncated"


def encode_record(encoder: Encoder, record: Record, index: int, location: str, *,
                  max_length: int, truncation: str = "truncate_completion",
                  completion_only_loss: bool = True):
    """Tokenize and fit one validated record.

    Returns (example or None, status, raw_length); the example is None when dropped
    (status "too_long" / "prompt_too_long", or "no_trained_tokens" when what is kept has no
    trained token, on either side of a pair: never an example with zero loss tokens).
    """
    i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
    if record.chosen is not None:
        sides = [encoder.sequence(record.prompt, c, location, tools=record.tools)
                 for c in (record.chosen, record.rejected)]
        fitted = [fit(*s, max_length, truncation) for s in sides]
        raw = max(len(s[0]) for s in sides)
        statuses = [f[2] for f in fitted]
        for bad in ("prompt_too_long", "too_long"):
            if bad in statuses:
                return None, bad, raw
        if not all(any(mask) for _, mask, _ in fitted):
            return None, "no_trained_tokens", raw
        status = "truncated" if "truncated" in statuses else "ok"
        (c_ids, c_mask, _), (r_ids, r_mask, _) = fitted
        return PreferenceExample(i32(c_ids), i32(c_mask), i32(r_ids), i32(r_mask), index), status, raw
    if record.text is not None:
        ids, mask, prompt_len = encoder.text(record.text)
    else:
        ids, mask, prompt_len = encoder.sequence(record.prompt, record.completion, location,
                                                 completion_only_loss, tools=record.tools)
    raw = len(ids)
    ids, mask, status = fit(ids, mask, prompt_len, max_length, truncation)
    if status in ("too_long", "prompt_too_long"):
        return None, status, raw
    if not any(mask):
        return None, "no_trained_tokens", raw
    return SFTExample(i32(ids), i32(mask), index), status, raw


def process_record(encoder: Encoder, raw, index: int, location: str, *, kind: str, fmt: str,
                   max_length: int, truncation: str, completion_only_loss: bool):
    """Validate, check against `kind`, tokenize and fit one raw record from `read_records`.

    Returns (format, example or None, status, raw_length) as `encode_record`; raises
    DataError for anything wrong with the record (a DataError in place of the record, from
    an undecodable line, is raised as is).
    """
    if isinstance(raw, DataError):
        raise raw
    record = parse_record(raw, location, fmt)
    check_kind(record.format, kind, location)
    example, status, raw_len = encode_record(
        encoder, record, index, location, max_length=max_length, truncation=truncation,
        completion_only_loss=completion_only_loss)
    return record.format, example, status, raw_len
