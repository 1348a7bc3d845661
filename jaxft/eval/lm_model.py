"""jaxft as an lm-evaluation-harness model: `JaxftLM`, registered with lm-eval as "jaxft".

From Python, `JaxftLM(model=decoder, tokenizer=tok)` wraps a loaded model for
`lm_eval.simple_evaluate(model=...)` (what `jaxft eval --benchmark lm_eval:TASK` does); from the
shell, `python -m jaxft.eval.lm_model --model jaxft --model_args pretrained=DIR --tasks ...` is
lm-eval's own command line with this module imported (lm-eval finds no model outside its package).

Requests are scored the way lm-eval's `HFLM` scores them, so numbers compare across backends:
  loglikelihood(context, continuation): `TemplateLM` tokenizes context + continuation whole and
    splits it (a context's trailing spaces move into the continuation); an empty context is the
    prefix token (BOS, else EOS). The input is the last `max_length` + 1 tokens, minus the last;
    the answer is (sum of the continuation's log-probs, whether greedy decoding gives it).
  loglikelihood_rolling(text): lm-eval's disjoint rolling windows of `max_length` tokens after the
    prefix token, each token scored once, summed.
  generate_until(context, gen_kwargs): jaxft's sampler (`jaxft.inference.sampler.sample_ids` on
    the context tokenized as HFLM does, left-truncated to max_length - max_gen_toks), stop strings
    `until` plus the EOS text, `max_gen_toks` (default 256), temperature / top_p / top_k.

Axis letters as in `jaxft.models.decoder`: B rows, L padded length. Rows of one call are sorted
by length, padded to a power-of-two length bucket (>= 32) and to `batch_size` rows (a multiple of
the device count), so a task compiles a handful of shapes, once per model graph and shape.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxft.errors import ConfigError
from jaxft.losses.chunked import chunked_token_logps
from jaxft.parallel.sharding import (
    BATCH_AXES, axis_size, batch_sharding, current_mesh, make_mesh, replicated, token_groups, vocab_parallel_axes,
)

log = logging.getLogger(__name__)

MIN_BUCKET = 32  # shortest padded row length
LOGIT_CHUNK = 1024  # scored tokens per [chunk, V] logits block


@functools.partial(jax.jit, static_argnums=0)
def score_rows(graphdef, state, inputs_BL, targets_BL, mask_BL, segment_ids_BL):
    """Summed log-prob of each row's scored targets and whether every one is the argmax.

    inputs_BL: int32 token ids, right-padded; targets_BL[b, t]: the token that input position t
    predicts; mask_BL: 1 where that target is scored; segment_ids_BL: 1 on real tokens, 0 on
    padding. Returns (float32 [B] sums, bool [B] greedy). Logits exist only at scored positions,
    LOGIT_CHUNK tokens at a time (`chunked_token_logps`), so a 150k vocabulary fits.
    """
    model = nnx.merge(graphdef, state)
    hidden_BLE = model(inputs_BL, None, segment_ids_BL, return_hidden=True)
    lm_head = model.lm_head_kernel().astype(hidden_BLE.dtype)
    logps_BL, correct_BL, _ = chunked_token_logps(
        hidden_BLE, lm_head, targets_BL, mask_BL, chunk_size=LOGIT_CHUNK,
        groups=token_groups(*targets_BL.shape), logit_softcap=model.cfg.final_logit_softcap,
        vocab_parallel=vocab_parallel_axes(*targets_BL.shape, lm_head.shape),
        lm_head_vocab_major=model.cfg.tie_word_embeddings)
    scored = mask_BL > 0
    return jnp.sum(jnp.where(scored, logps_BL, 0.0), axis=1), jnp.all(correct_BL | ~scored, axis=1)


def length_bucket(n: int, cap: int) -> int:
    """The padded length of a row of n tokens: the next power of two >= MIN_BUCKET, at most cap
    (itself never below n)."""
    return max(n, min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length())))


class JaxftLM(TemplateLM):
    """An lm-eval model on jaxft's forward pass and sampler.

    pretrained: a Hugging Face model folder (or a run's workdir) to load; or pass `model` (a
      jaxft Decoder) and `tokenizer` directly. batch_size: rows per forward pass (rounded up to
      a multiple of the device count; lm-eval's "auto" means 16). max_length: the longest input, default the model's
      max_position_embeddings. add_bos_token / prefix_token_id: as HFLM's. seed: the sampler's.
    mesh: the devices rows split over, params replicated on them (default: every device); under an
      ambient `jax.set_mesh` (a training run's evaluation) that mesh, with the params sharded as
      they are, so a model sharded for training is never gathered whole.
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, seed: int = 0, mesh=None, **unused):
        super().__init__()
        if pretrained is not None:
            from jaxft.inference.generate import load_folder

            model, tokenizer = load_folder(str(pretrained), flag="pretrained")
        if model is None or tokenizer is None:
            raise ConfigError("JaxftLM needs pretrained=DIR, or both model= and tokenizer=")
        for key, value in unused.items():
            if value is not None and key not in ("device", "max_batch_size"):
                log.warning("JaxftLM ignores %s=%r", key, value)
        self.model, self.tokenizer = model, tokenizer
        # Under an ambient mesh (`jax.set_mesh`: a training run's), that mesh and the params as
        # they are sharded; otherwise `mesh`, or a ("data",) mesh over all devices, params replicated.
        ambient = current_mesh() if mesh is None else None
        self.mesh = None if ambient is not None else (mesh or make_mesh(data=-1))
        rows = math.prod(axis_size(ambient or self.mesh, a) for a in BATCH_AXES)
        asked = 16 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        self._batch_size = -(-asked // rows) * rows
        self._max_length = int(max_length or model.cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = int(seed)
        self._graphdef, self._state = nnx.split(model)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                self._state = jax.device_put(self._state, replicated(self.mesh))

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # -- what lm-eval reads --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "jaxft")).replace("/", "__")

    def get_model_info(self) -> dict:
        params = nnx.state(self.model, nnx.Param)
        return {"model_num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
                "model_dtype": str(self.model.cfg.compute_dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """HFLM's tok_encode: the tokenizer's special tokens unless told (add_special_tokens,
        else add_bos_token), none when the string already starts with the prefix token's text."""
        special = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # -- scoring -------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], *, progress: bool = False
                     ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) of each (context ids, continuation ids),
        both non-empty; the input keeps the last max_length + 1 tokens, minus the last (HFLM)."""
        rows = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("score_tokens needs a non-empty context and continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        B = self.batch_size
        with tqdm(total=len(rows), disable=not progress, desc="jaxft loglikelihood") as bar:
            for start in range(0, len(order), B):
                chunk = order[start:start + B]
                L = length_bucket(len(rows[chunk[0]][0]) - 1, self.max_length)
                arrays = np.zeros((4, B, L), np.int32)  # inputs, targets, mask, segment ids
                for b, i in enumerate(chunk):
                    whole, n_scored = rows[i]
                    n = len(whole) - 1
                    arrays[0, b, :n], arrays[1, b, :n] = whole[:-1], whole[1:]
                    arrays[2, b, n - n_scored:n] = 1
                    arrays[3, b, :n] = 1
                with self._on_mesh():
                    if self.mesh is not None:
                        arrays = [jax.device_put(a, batch_sharding(self.mesh)) for a in arrays]
                    sums, greedy = jax.device_get(score_rows(self._graphdef, self._state, *arrays))
                for b, i in enumerate(chunk):
                    results[i] = (float(sums[b]), bool(greedy[b]))
                bar.update(len(chunk))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self.score_tokens(windows, progress=not disable_tqdm)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions by jaxft's sampler (`jaxft.inference.sampler`), one per request, cut at the
        first stop string. Contexts are tokenized as HFLM does (`tok_encode`: no second BOS after
        a chat template's) and left-truncated to max_length - max_gen_toks tokens; requests with
        the same gen_kwargs are sampled together."""
        from jaxft.inference.completions import finish
        from jaxft.inference.sampler import sample_ids

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        eos_ids = list(dict.fromkeys(e for e in (self.tokenizer.eos_token_id, self.model.cfg.eos_token_id)
                                     if isinstance(e, int)))
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_new} must be below the model's max_length {self.max_length}")
            stop = [s for s in until if s]
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                       for i in indices]
            rows = sample_ids(
                self.model, prompts, samples=1, max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0), eos_ids=eos_ids,
                stop_check=(lambda ids: any(s in self.tok_decode(ids) for s in stop)) if stop else None,
                seed=self.seed, batch_size=self.batch_size, mesh=self.mesh, progress=not disable_tqdm)
            for i, (tokens,) in zip(indices, rows):
                text = finish(tokens, eos_ids=eos_ids, stop=stop, decode=self.tok_decode).text
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


# lm-eval's lazy registration (as its own models are): `get_model("jaxft")` imports this module by
# name, so running it as __main__ registers the same entry, not a second class.
model_registry.register("jaxft", target="jaxft.eval.lm_model:JaxftLM")

if __name__ == "__main__":  # lm-eval's command line, with "jaxft" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
