"""Batched KV-cache sampling for every jaxft model family: greedy, temperature, top-k, top-p.

Axis letters as in `jaxft.models.decoder`: B batch, P padded prompt length, N max new tokens,
T cache length (P + N), V vocab.

Prompts are left-padded to a common bucket length P (a multiple of `prompt_bucket`), so every
row's last prompt token sits at cache index P - 1 and one shared `cache_index` serves the whole
batch. Padding gets segment id 0 (the model never attends to it) and positions count real
tokens only, so a padded row computes exactly what it would alone. The prompt is prefilled in
one call, then a `lax.while_loop` decodes one token per step until every row has emitted an
EOS or N tokens exist. Prefill and decode are one jitted function, compiled once per
(B, P, N, greedy or not, cache dtype, model graph); params travel as an argument.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import ConfigError, DataError
from jaxft.models.decoder import init_cache
from jaxft.models.parts import soft_cap
from jaxft.parallel.sharding import constrain

PROMPT_BUCKET = 32  # prompt lengths round up to this, so few prompt shapes ever compile
MAX_EOS_IDS = 8  # EOS ids travel in a fixed-size array (Llama 3 has 3, Qwen 2)


def _filter_logits(logits_BV: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers orders them.

    logits_BV: [B, V] float32; temperature, top_k, top_p: scalars (traced, so changing them
    does not recompile). top_k <= 0 (or >= V) and top_p >= 1 disable those filters.
    Returns [B, V] logits with the filtered-out tokens at -inf.
    """
    V = logits_BV.shape[-1]
    logits_BV = logits_BV / temperature
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)  # descending
    # Top-k through the k-th largest logit (ties with it survive too).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
    # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. A token is
    # kept when the mass strictly before it (in descending order) is < top_p, so the most likely
    # token always survives. Applied as a logit threshold, which needs no unsort.
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # top_p >= 1 keeps everything: cumsum rounding must not drop the tail.
    keep_BV = (mass_before_BV < top_p) | (top_p >= 1.0)
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def _next_token(logits_BV, key, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = _filter_logits(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "cache_dtype"))
def _generate_jit(graphdef, state, tokens_BP, lengths_B, eos_ids, pad_id, temperature, top_k, top_p,
                  key, *, max_new_tokens: int, greedy: bool, cache_dtype):
    """Prefill + decode loop. Returns (new tokens [B, N] int32, pad after EOS; steps run)."""
    model = nnx.merge(graphdef, state)
    B, P = tokens_BP.shape
    N = max_new_tokens
    kernel_EV = model.lm_head_kernel()

    def logits_last(hidden_BLE):
        # Only the last position is needed: never materialise [B, P, V] during prefill.
        h_BE = hidden_BLE[:, -1, :]
        return soft_cap((h_BE @ kernel_EV.astype(h_BE.dtype)).astype(jnp.float32), model.cfg.final_logit_softcap)

    def is_eos(tok_B):
        return jnp.any(tok_B[:, None] == eos_ids[None, :], axis=-1)

    # Left padding: row b's real tokens occupy columns P - len_b .. P - 1.
    col_P = jnp.arange(P, dtype=jnp.int32)
    pad_B = (P - lengths_B).astype(jnp.int32)
    real_BP = col_P[None, :] >= pad_B[:, None]
    segment_ids_BP = real_BP.astype(jnp.int32)
    positions_BP = jnp.where(real_BP, col_P[None, :] - pad_B[:, None], 0)

    cache = init_cache(model.cfg, B, P + N, cache_dtype)
    hidden, cache = model(tokens_BP, positions_BP, segment_ids_BP, cache=cache, cache_index=0,
                          return_hidden=True)
    first_B = _next_token(logits_last(hidden), jax.random.fold_in(key, 0), temperature, top_k,
                          top_p, greedy=greedy)
    out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = is_eos(first_B)

    def cond(carry):
        step, _, _, done_B, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        # Feed token `step - 1` (the last sampled) at cache slot P + step - 1, sample token `step`.
        step, cache, last_B, done_B, out_BN = carry
        positions_B1 = (lengths_B + step - 1)[:, None].astype(jnp.int32)
        hidden, cache = model(last_B[:, None], positions_B1, jnp.ones((B, 1), jnp.int32),
                              cache=cache, cache_index=P + step - 1, return_hidden=True)
        tok_B = _next_token(logits_last(hidden), jax.random.fold_in(key, step), temperature, top_k,
                            top_p, greedy=greedy)
        tok_B = jnp.where(done_B, pad_id, tok_B)  # finished rows keep emitting pad
        out_BN = jax.lax.dynamic_update_slice(out_BN, tok_B[:, None], (0, step))
        return step + 1, cache, tok_B, done_B | is_eos(tok_B), out_BN

    steps, _, _, _, out_BN = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, first_B, done_B, out_BN)
    )
    # Under a mesh (sampling during training, on sharded params) every host reads all rows.
    return constrain(out_BN, (None, None)), steps


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
) -> tuple[np.ndarray, int]:
    """Like `generate`, but returns the raw result: (tokens [B, N] int32 with `pad_token_id`
    after each row's first EOS, number of decode steps actually run (< N when all rows hit EOS
    early))."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature=}, {top_p=}, {top_k=}")
    lengths = [len(p) for p in prompt_ids]
    if not lengths or min(lengths) == 0:
        raise DataError("generate needs at least one prompt and every prompt needs >= 1 token")
    eos = _eos_list(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos or [0])[0]
    B, P = len(prompt_ids), _round_up(max(lengths), prompt_bucket)
    tokens = np.full((B, P), pad_token_id, np.int32)
    for b, ids in enumerate(prompt_ids):
        tokens[b, P - len(ids):] = ids
    graphdef, state = nnx.split(model)
    # A fixed-size EOS array (impossible id -1 fills it) keeps the compiled shape the same
    # whatever the number of EOS ids.
    if len(eos) > MAX_EOS_IDS:
        raise ConfigError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
    eos_arr = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos_arr[:len(eos)] = eos
    out, steps = _generate_jit(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), jnp.asarray(eos_arr),
        jnp.int32(pad_token_id), jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k),
        jnp.float32(top_p), jax.random.key(seed), max_new_tokens=max_new_tokens,
        greedy=temperature == 0.0, cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
    )
    return np.asarray(jax.device_get(out)), int(steps)


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
      (0 = off) and `top_p` (1.0 = off) and sampled with `jax.random` keys from `seed`.
    eos_token_id: one id or several, up to 8 (default: the model config's; [] = never stop
      early). pad_token_id: what fills finished rows (default: config's pad, else first EOS).
    cache_dtype: KV-cache dtype (default: the model's compute dtype). `options` are those of
      `generate_array`: temperature, top_k, top_p, pad_token_id, seed, cache_dtype, prompt_bucket.
    Returns B lists of new token ids only, each cut after its first EOS **with the EOS
    included** (as transformers' `generate` does), so a list that does not end in EOS ran
    into `max_new_tokens`.
    """
    out_BN, _ = generate_array(model, prompt_ids, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, **options)
    eos = set(_eos_list(model, eos_token_id))
    results = []
    for row in out_BN.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


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


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    chat: bool | None = None,
    batch_size: int = 16,
    **sampling,
) -> list[str]:
    """Generates a completion string for each prompt (see `encode_prompts` for `chat`).

    Prompts run in batches of `batch_size`; the last batch is filled up with copies of a
    prompt (results discarded) so every batch reuses one compiled shape. `sampling` goes to
    `generate` (max_new_tokens, temperature, top_k, top_p, seed, ...); EOS and pad default to
    the tokenizer's. Completions are decoded with `skip_special_tokens=True`.
    """
    all_ids = encode_prompts(tokenizer, prompts, chat=chat)
    sampling.setdefault("eos_token_id", tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling.setdefault("pad_token_id", pad)
    texts = []
    for start in range(0, len(all_ids), batch_size):
        batch = all_ids[start:start + batch_size]
        n_real = len(batch)
        if len(all_ids) > batch_size:
            batch = batch + [batch[0]] * (batch_size - n_real)
        outputs = generate(model, batch, **sampling)[:n_real]
        texts.extend(tokenizer.batch_decode(outputs, skip_special_tokens=True))
    return texts


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
) -> list[str]:
    """`jaxft generate`: loads an HF folder (model + tokenizer; a run's workdir stands for its
    export WORKDIR/hf) and completes `prompts`.

    chat=None: string prompts become user messages under the chat template when the
    tokenizer has one (chat models), and are completed as raw text otherwise.
    """
    model, tokenizer = load_folder(model_dir)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    return generate_text(
        model, tokenizer, prompts, chat=chat, batch_size=batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
    )


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
