"""Generation from token ids or text with a KV cache: `generate` (token ids), `generate_text`
(strings), `generate_cli` (`jaxft generate`), all through the sampler of
`jaxft.inference.sampler` (length buckets, per-row seeds, stop strings, data-parallel rows).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxft.errors import DataError
from jaxft.inference import sampler
from jaxft.inference.completions import finish, sample_completions
from jaxft.inference.prompts import encode_prompts  # noqa: F401 (public name)
from jaxft.inference.sampler import PROMPT_BUCKET


def _eos_list(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.cfg.eos_token_id
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (int, np.integer)):
        return [int(eos_token_id)]
    return [int(e) for e in eos_token_id]


def generate_array(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    cache_dtype=None,
    prompt_bucket: int = PROMPT_BUCKET,
    batch_size: int | None = None,
) -> tuple[np.ndarray, int]:
    """Like `generate`, but returns the raw result: (tokens [B, N] int32 with `pad_token_id`
    after each row's first EOS, the number of tokens the longest row sampled (< N when every
    row hit EOS early)). batch_size: rows decoded together (default: all B at once)."""
    eos = _eos_list(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos or [0])[0]
    rows = sampler.sample_ids(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_ids=eos, seed=seed, cache_dtype=cache_dtype,
                              prompt_bucket=prompt_bucket, batch_size=batch_size or max(len(prompt_ids), 1))
    out = np.full((len(rows), max_new_tokens), pad_token_id, np.int32)
    steps = 0
    for b, (row,) in enumerate(rows):
        ids = finish(row, eos_ids=eos).token_ids
        out[b, :len(ids)] = ids
        steps = max(steps, len(ids))
    return out, steps


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    **options,
) -> list[list[int]]:
    """Samples continuations of a batch of token-id prompts with a KV cache.

    model: a jaxft `Decoder`. prompt_ids: B lists of ids (any lengths >= 1; tokenizer special
      tokens such as BOS already in place).
    temperature: 0 = greedy (argmax); else logits / temperature are filtered by `top_k`
      (0 = off) and `top_p` (1.0 = off) and sampled, row b with keys from `seed` as
      `jaxft.inference.sampler` derives them (the same for any batch).
    eos_token_id: one id or several, up to 8 (default: the model config's; [] = never stop
      early). pad_token_id: what fills finished rows of `generate_array` (default: config's
      pad, else first EOS). `options` are those of `generate_array`: temperature, top_k,
      top_p, pad_token_id, seed, cache_dtype (KV-cache dtype; default the model's compute
      dtype), prompt_bucket, batch_size.
    Returns B lists of new token ids only, each cut after its first EOS **with the EOS
    included** (as transformers' `generate` does), so a list that does not end in EOS ran
    into `max_new_tokens`.
    """
    eos = _eos_list(model, eos_token_id)
    options.pop("pad_token_id", None)  # only generate_array fills rows
    batch_size = options.pop("batch_size", None) or max(len(prompt_ids), 1)
    rows = sampler.sample_ids(model, prompt_ids, max_new_tokens=max_new_tokens, eos_ids=eos,
                              batch_size=batch_size, **options)
    return [finish(row, eos_ids=eos).token_ids for (row,) in rows]


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    chat: bool | None = None,
    batch_size: int = 16,
    **sampling,
) -> list[str]:
    """A completion string for each prompt (see `encode_prompts` for `chat`): the text of
    `jaxft.inference.completions.sample_completions` with one sample (decoded with
    `skip_special_tokens=True`). `sampling`: max_new_tokens, temperature, top_k, top_p, seed,
    stop, progress, ... as `sample_completions` takes them; EOS: the tokenizer's and the
    model config's.
    """
    completions = sample_completions(model, tokenizer, prompts, chat=chat, batch_size=batch_size,
                                             **sampling)
    return [c[0].text for c in completions]


def generate_cli(
    model_dir: str,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chat: bool | None = None,
    seed: int = 0,
    batch_size: int = 16,
    samples: int = 1,
    stop: Sequence[str] = (),
) -> list[list[str]]:
    """`jaxft generate`: loads an HF folder (model + tokenizer; a run's workdir stands for its
    export WORKDIR/hf) and completes `prompts`: out[i][j] is sample j of prompt i (`samples`
    per prompt from one prefill, sample j drawn with seed + j; each cut before the first of
    `stop`, as `jaxft.inference.completions.sample_completions` does).

    chat=None: string prompts become user messages under the chat template when the
    tokenizer has one (chat models), and are completed as raw text otherwise.
    """
    model, tokenizer = load_folder(model_dir)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    completions = sample_completions(
        model, tokenizer, prompts, chat=chat, batch_size=batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, samples=samples, stop=stop,
    )
    return [[c.text for c in group] for group in completions]


def load_folder(path: str, *, flag: str = "--model"):
    """(jaxft model, tokenizer) of a Hugging Face model folder; a run's workdir stands for its
    export WORKDIR/hf. Errors name `flag` and the folder (a missing or damaged file, which)."""
    import transformers

    from jaxft.io.folders import model_folder
    from jaxft.models import load_hf

    folder = model_folder(path, flag=flag)
    try:  # first: it is cheap, and a folder without tokenizer files should fail before the weights load
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"{flag} {folder}: cannot load its tokenizer ({' '.join(str(err).split())[:300]}); a "
                         "model folder needs the tokenizer files jaxft export writes (tokenizer.json, "
                         "tokenizer_config.json)") from err
    return load_hf(folder), tokenizer
