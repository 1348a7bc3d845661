"""Prompts as token ids: strings raw or under the chat template, message lists under it."""

from __future__ import annotations

from typing import Sequence

from jaxft.errors import DataError


def encode_prompts(
    tokenizer, prompts: Sequence[str | list[dict]], *, chat: bool | None = None
) -> list[list[int]]:
    """Token ids for each prompt, ready for `generate`.

    Message lists (and strings when `chat=True`, wrapped as one user message) go through the
    tokenizer's chat template with the generation prompt. The template writes any BOS itself,
    so the rendered text is tokenized with `add_special_tokens=False`: exactly one BOS.
    Plain strings (`chat` None or False) are tokenized with the tokenizer's special tokens,
    matching the data pipeline's `prompt_ids = tok(prompt)`.
    """
    ids = []
    for i, prompt in enumerate(prompts):
        is_messages = not isinstance(prompt, str)
        if is_messages and chat is False:
            raise DataError(f"prompt {i} is a message list but chat=False")
        if is_messages or chat:
            messages = prompt if is_messages else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    return ids
