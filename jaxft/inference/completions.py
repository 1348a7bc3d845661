"""Completions as text: prompts encoded (chat template or raw), sampled by `jaxft.inference.sampler`,
each row cut at its EOS or first stop string and decoded."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxft.inference import sampler


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    text: the new tokens decoded with skip_special_tokens=True, cut before the first stop
      string (the stop string is not included).
    token_ids: the new tokens, through the EOS if it ended on EOS, through the tokens that
      complete the stop string if it ended on one.
    finish_reason: "eos" | "stop" | "length" (max_new_tokens reached).
    """

    text: str
    token_ids: list[int]
    finish_reason: str


def finish(tokens: list[int], *, eos_ids: Sequence[int], stop: Sequence[str] = (), decode=None) -> Completion:
    """Cuts one row's sampled tokens into a `Completion`: after its first EOS (included), then
    before the first stop string in its text (the tokens through the ones completing it kept).
    decode: tokens -> text (skip_special_tokens=True); needed when there is text to build."""
    eos = set(eos_ids)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
    ids = tokens if cut is None else tokens[:cut]
    reason = "length" if cut is None else "eos"
    if decode is None:
        return Completion("", ids, reason)
    text = decode(ids)
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:
        pos = min(h[0] for h in hits)
        # The fewest tokens whose text holds a stop string (monotone in n: binary search).
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            piece = decode(ids[:mid])
            if any(s and s in piece for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return Completion(text[:pos], ids[:lo], "stop")
    return Completion(text, ids, reason)


def eos_ids(tokenizer, model_config) -> list[int]:
    """The tokenizer's EOS and the model config's (a chat model ends turns on either)."""
    ids = []
    for e in (tokenizer.eos_token_id, model_config.eos_token_id):
        ids.extend([] if e is None else [e] if isinstance(e, (int, np.integer)) else list(e))
    return list(dict.fromkeys(int(e) for e in ids))


def sample_completions(model, tokenizer, prompts: Sequence[str | list[dict]], *, samples: int = 1,
                       max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       stop: Sequence[str] = (), chat: bool | None = None, seed: int = 0,
                       batch_size: int = 16, progress: bool = False, **options) -> list[list[Completion]]:
    """completions[i][j]: sample j of prompt i, a `Completion`.

    prompts: strings or message lists, encoded as `jaxft.inference.prompts.encode_prompts`
      encodes them (`chat`: None = message lists through the chat template, strings raw).
    temperature 0 = greedy (the k samples are identical); else logits / temperature, filtered
      by top_k (0 = off) then top_p (1.0 = off), sampled with key fold_in(key(seed + j), t)
      for token t of sample j: deterministic for a seed, independent of batching and of the
      other prompts (sample j of prompt i equals sample_completions([prompt_i], samples=1,
      seed=seed + j)[0][0]).
    stop: strings that end a completion (matched on the decoded text, so one may span
      tokens); EOS: the tokenizer's and the model config's.
    batch_size: rows decoded together (prompts x samples; a prompt's samples share a prefill).
    progress: a tqdm bar with tokens/s. options: `sample_ids`'s cache_dtype, prompt_bucket,
      chunk, mesh, unroll.
    """
    from jaxft.inference.prompts import encode_prompts

    ids = encode_prompts(tokenizer, prompts, chat=chat)
    eos = eos_ids(tokenizer, model.cfg)
    stop = [s for s in stop if s]

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def stop_check(tokens):
        text = decode(tokens)
        return any(s in text for s in stop)

    rows = sampler.sample_ids(model, ids, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, eos_ids=eos, stop_check=stop_check if stop else None, seed=seed,
                      batch_size=batch_size, progress=progress, **options)
    return [[finish(r, eos_ids=eos, stop=stop, decode=decode) for r in per_prompt] for per_prompt in rows]
