"""The sampler's compiled programs: prefill a batch of prompts (each prompt's cache copied to its
samples' rows), decode a chunk of steps in one `lax.while_loop`, and gather the live rows into a
smaller batch. Axis letters as in `jaxft.inference.sampler`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.inference.logits import Mode, next_tokens
from jaxft.models.decoder import init_cache
from jaxft.models.parts import soft_cap
from jaxft.parallel import sharding


def _last_logits(model, hidden_BLE):
    """Logits of the last position only: never [B, P, V] during prefill."""
    h_BE = hidden_BLE[:, -1, :]
    kernel_EV = model.lm_head_kernel()
    return soft_cap((h_BE @ kernel_EV.astype(h_BE.dtype)).astype(jnp.float32), model.cfg.final_logit_softcap)


def _rows(axis_of: dict, cache: dict, fn) -> dict:
    """Applies fn(leaf, batch axis) to every cache leaf."""
    return jax.tree.map(fn, cache, axis_of)


@functools.cache
def cache_batch_axes(cfg) -> dict:
    """The batch axis of every `init_cache` leaf (a pytree like the cache): where its shape
    changes with the batch size. Works for every layout (stacked, per layer, layer groups)."""
    two, three = (jax.eval_shape(lambda b=b: init_cache(cfg, b, 4)) for b in (2, 3))
    return jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y),
                        two, three)


def _constrain_rows(x, axis: int):
    """Rows (axis `axis`) split over the ambient mesh's batch axes."""
    names = [None] * x.ndim
    names[axis] = "act_batch"
    return sharding.constrain(x, names)


@functools.partial(jax.jit, static_argnames=("graphdef", "group", "max_new_tokens", "mode", "cache_dtype"))
def prefill(graphdef, state, tokens_UP, lengths_U, keys_R, knobs, *, group: int, max_new_tokens: int,
             mode: Mode, cache_dtype):
    """Prefills U left-padded prompts once and copies each one's cache to its G rows.

    Returns the decode carry: {"cache" (R rows, T = P + N), "last" [R] (token 0), "out" [R, N]
    (token 0 in column 0), "done" [R] (False), "step" () = 1}; EOS is checked by the caller's
    first chunk."""
    model = nnx.merge(graphdef, state)
    U, P = tokens_UP.shape
    col_P = jnp.arange(P, dtype=jnp.int32)
    pad_U = (P - lengths_U).astype(jnp.int32)
    real_UP = col_P[None, :] >= pad_U[:, None]  # left padding: segment 0, never attended
    positions_UP = jnp.where(real_UP, col_P[None, :] - pad_U[:, None], 0)
    cache = init_cache(model.cfg, U, P + max_new_tokens, cache_dtype)
    hidden, cache = model(tokens_UP, positions_UP, real_UP.astype(jnp.int32), cache=cache, cache_index=0,
                          return_hidden=True)
    axes = cache_batch_axes(model.cfg)
    cache = _rows(axes, cache, lambda x, a: _constrain_rows(jnp.repeat(x, group, axis=a), a))
    logits_RV = jnp.repeat(_last_logits(model, hidden), group, axis=0)
    first_R = next_tokens(logits_RV, keys_R, 0, knobs, mode)
    R = U * group
    out_RN = jnp.zeros((R, max_new_tokens), jnp.int32).at[:, 0].set(first_R)
    return {"cache": cache, "last": first_R, "out": _constrain_rows(out_RN, 0),
            "done": jnp.zeros((R,), bool), "step": jnp.int32(1)}


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def decode(graphdef, state, carry, lengths_R, keys_R, eos_ids, prompt_len, stop_step, knobs, *, mode: Mode):
    """Decodes until `stop_step` tokens exist or every row is done (a row is done once it has
    sampled an EOS or the host stopped it). Finished rows keep decoding as padding (their
    tokens are ignored). Returns the carry advanced."""
    model = nnx.merge(graphdef, state)
    R = lengths_R.shape[0]

    def is_eos(tok_R):
        return jnp.any(tok_R[:, None] == eos_ids[None, :], axis=-1)

    def cond(c):
        return (c["step"] < stop_step) & ~jnp.all(c["done"])

    def body(c):
        # Feed token step - 1 (the last sampled) at cache slot P + step - 1; sample token `step`.
        step = c["step"]
        positions_R1 = (lengths_R + step - 1)[:, None].astype(jnp.int32)
        hidden, cache = model(c["last"][:, None], positions_R1, jnp.ones((R, 1), jnp.int32), cache=c["cache"],
                              cache_index=prompt_len + step - 1, return_hidden=True)
        tok_R = next_tokens(_last_logits(model, hidden), keys_R, step, knobs, mode)
        out_RN = jax.lax.dynamic_update_slice(c["out"], tok_R[:, None], (0, step))
        return {"cache": cache, "last": tok_R, "out": out_RN, "done": c["done"] | is_eos(tok_R), "step": step + 1}

    # Token 0 came from the prefill: an EOS there ends its row before any decode step.
    carry = dict(carry, done=carry["done"] | ((carry["step"] == 1) & is_eos(carry["out"][:, 0])))
    return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("cfg",))
def gather_rows(carry, lengths_R, keys_R, rows_S, *, cfg):
    """The carry, prompt lengths and keys of rows `rows_S` only ([S] indices): a smaller batch."""
    cache = jax.tree.map(lambda x, a: _constrain_rows(jnp.take(x, rows_S, axis=a), a), carry["cache"],
                         cache_batch_axes(cfg))
    carry = {"cache": cache, "step": carry["step"],
             **{k: _constrain_rows(carry[k][rows_S], 0) for k in ("last", "out", "done")}}
    return carry, lengths_R[rows_S], keys_R[rows_S]
