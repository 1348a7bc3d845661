"""The sampler for evaluation and rollouts: k samples per prompt from one prefill, stop strings,
per-row seeds, length buckets, data-parallel rows.

Axis letters as in `jaxft.models.decoder`: U prompt units in a batch (a prompt and a group of
its samples), G samples per unit, R = U x G rows, P padded prompt length, N max new tokens,
T cache length (P + N), V vocab.

How a call runs (`sample_ids`):
  1. Every prompt's `samples` are split into groups of at most `batch_size` rows ("units").
     Units are sorted by prompt length and cut into batches of `batch_size // G` units, so
     short prompts never pad to long ones; results come back in input order.
  2. A batch's prompts are left-padded to a bucket P (a multiple of `prompt_bucket`) and
     prefilled once, U rows; the cache is then copied to the G rows of each unit.
  3. Decoding runs in chunks of `chunk` steps (one jitted `lax.while_loop` each). A row stops
     on device when it samples an EOS; between chunks the host decodes each live row's text
     and stops the rows that contain a stop string (a stop string may span tokens, so it is
     matched on text, not token ids). A chunk ends early when every row is done, and a batch
     ends when every row is done; when at most half the rows are live (and a chunk or more is
     left), the live ones are gathered into a batch half the size or smaller (finished rows
     stop costing; one more compiled decode per size).
  4. With several devices the rows are split over the mesh's batch axes ("data"): under an
     ambient mesh (`jax.set_mesh`) that mesh and the params as they are sharded; otherwise
     `mesh=` or a ("data",) mesh over all devices, the params placed by the rules table
     (`sharding.param_shardings`: replicated over "data", split over "fsdp" / "tensor").
     With several processes (`jax.distributed`), every process passes the same prompts, the
     mesh spans all of them, and each gets every row's tokens back (gathered between chunks).

Seeds: token t (0-based among the new tokens) of sample j of a prompt with token ids `ids` is
drawn with key `fold_in(fold_in(jax.random.key(seed + j), prompt_hash(ids)), t)` from that
row's filtered logits alone (`jax.random.categorical` on the row); `prompt_hash` is the CRC-32
of the ids, so different prompts do not share their noise. Nothing depends on the batch, the
row's position or the other prompts, so sample j of prompt i equals
`sample_completions([prompt_i], samples=1, seed=seed + j)[0][0]` whatever the batching (up to
floating-point differences of the forward between batch shapes, which the tests do not see on
CPU). Greedy decoding (temperature 0) ignores the keys: its k samples are identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import ConfigError, DataError
from jaxft.models.decoder import init_cache
from jaxft.models.parts import soft_cap
from jaxft.parallel import sharding

PROMPT_BUCKET = 32  # prompt lengths round up to this, so few prompt shapes ever compile
CHUNK = 32  # decode steps between host checks (stop strings, progress, compaction)
MAX_EOS_IDS = 8  # EOS ids travel in a fixed-size array (Llama 3 has 3, Qwen 2)
# A scanned model is sampled with its layers unrolled (a copy of its params) up to this size: in
# a scanned stack every decode step writes the whole stacked KV cache anew (scan's outputs are new
# buffers); unrolled, each layer's cache is updated in place. smollm2_135m, 16 rows, 96 new
# tokens on CPU: 136 against 87 tokens/s.
UNROLL_MAX_BYTES = 2 << 30


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


# --- on device ---------------------------------------------------------------------------------


def filter_logits(logits_BV: jax.Array, temperature, top_k, top_p, *, use_top_k: bool = True,
                  use_top_p: bool = True) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers orders them.

    logits_BV: [B, V] float32; temperature, top_k, top_p: scalars (traced, so changing them
    does not recompile). top_k <= 0 (or >= V) and top_p >= 1 disable those filters; use_top_k /
    use_top_p False skip them statically (no sort when neither is on). Row-wise: a row's
    result does not depend on the others. Returns [B, V] logits, filtered-out tokens at -inf.
    """
    V = logits_BV.shape[-1]
    logits_BV = logits_BV / temperature
    if not (use_top_k or use_top_p):
        return logits_BV
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)  # descending
    if use_top_k:  # through the k-th largest logit (ties with it survive too)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
        sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
    if use_top_p:
        # Keep the smallest set of most likely tokens whose mass reaches top_p. A token is kept
        # when the mass strictly before it (descending) is < top_p, so the most likely token
        # always survives. Applied as a logit threshold, which needs no unsort.
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = (mass_before_BV < top_p) | (top_p >= 1.0)  # cumsum rounding must not drop the tail
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return logits_BV


@dataclasses.dataclass(frozen=True)
class _Mode:
    """What the compiled programs specialise on (static): sampling filters on or off."""

    greedy: bool
    use_top_k: bool
    use_top_p: bool


def argmax(x_RV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN if any), as a max and a
    min over indices: XLA:CPU runs jnp.argmax's (value, index) reduction unvectorised, 1.8 ms
    against 0.25 ms on [16, 49152] logits, every decode step. [R] int32."""
    top_R1 = jnp.max(x_RV, axis=-1, keepdims=True)
    hit_RV = (x_RV == top_R1) | jnp.isnan(x_RV)
    index_V = jnp.arange(x_RV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit_RV, index_V, x_RV.shape[-1] - 1), axis=-1)


def _sample(logits_RV, keys_R, step, knobs, mode: _Mode) -> jax.Array:
    """Token `step` of each row: argmax, or categorical under fold_in(row key, step). [R] int32."""
    logits_RV = logits_RV.astype(jnp.float32)
    if mode.greedy:
        return argmax(logits_RV)
    temperature, top_k, top_p = knobs
    filtered_RV = filter_logits(logits_RV, temperature, top_k, top_p, use_top_k=mode.use_top_k,
                                use_top_p=mode.use_top_p)
    step_keys_R = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_R, step)
    return jax.vmap(jax.random.categorical)(step_keys_R, filtered_RV).astype(jnp.int32)


def _last_logits(model, hidden_BLE):
    """Logits of the last position only: never [B, P, V] during prefill."""
    h_BE = hidden_BLE[:, -1, :]
    kernel_EV = model.lm_head_kernel()
    return soft_cap((h_BE @ kernel_EV.astype(h_BE.dtype)).astype(jnp.float32), model.cfg.final_logit_softcap)


def _rows(axis_of: dict, cache: dict, fn) -> dict:
    """Applies fn(leaf, batch axis) to every cache leaf."""
    return jax.tree.map(fn, cache, axis_of)


@functools.cache
def _cache_batch_axes(cfg) -> dict:
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
def _prefill(graphdef, state, tokens_UP, lengths_U, keys_R, knobs, *, group: int, max_new_tokens: int,
             mode: _Mode, cache_dtype):
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
    axes = _cache_batch_axes(model.cfg)
    cache = _rows(axes, cache, lambda x, a: _constrain_rows(jnp.repeat(x, group, axis=a), a))
    logits_RV = jnp.repeat(_last_logits(model, hidden), group, axis=0)
    first_R = _sample(logits_RV, keys_R, 0, knobs, mode)
    R = U * group
    out_RN = jnp.zeros((R, max_new_tokens), jnp.int32).at[:, 0].set(first_R)
    return {"cache": cache, "last": first_R, "out": _constrain_rows(out_RN, 0),
            "done": jnp.zeros((R,), bool), "step": jnp.int32(1)}


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def _decode(graphdef, state, carry, lengths_R, keys_R, eos_ids, prompt_len, stop_step, knobs, *, mode: _Mode):
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
        tok_R = _sample(_last_logits(model, hidden), keys_R, step, knobs, mode)
        out_RN = jax.lax.dynamic_update_slice(c["out"], tok_R[:, None], (0, step))
        return {"cache": cache, "last": tok_R, "out": out_RN, "done": c["done"] | is_eos(tok_R), "step": step + 1}

    # Token 0 came from the prefill: an EOS there ends its row before any decode step.
    carry = dict(carry, done=carry["done"] | ((carry["step"] == 1) & is_eos(carry["out"][:, 0])))
    return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gather_rows(carry, lengths_R, keys_R, rows_S, *, cfg):
    """The carry, prompt lengths and keys of rows `rows_S` only ([S] indices): a smaller batch."""
    cache = jax.tree.map(lambda x, a: _constrain_rows(jnp.take(x, rows_S, axis=a), a), carry["cache"],
                         _cache_batch_axes(cfg))
    carry = {"cache": cache, "step": carry["step"],
             **{k: _constrain_rows(carry[k][rows_S], 0) for k in ("last", "out", "done")}}
    return carry, lengths_R[rows_S], keys_R[rows_S]


# --- on the host -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="plan")
def _unstack(values, plan):
    return [values[k] if i < 0 else values[k][i] for k, i in plan]


@functools.cache
def _unrolled_layout(cfg):
    """(graphdef, flat abstract state) of an unrolled model of `cfg`: built once per config
    (tracing 30 layers' construction took 1-2 s of every sampling call)."""
    from jaxft.models.hf import abstract_model

    graphdef, abstract = nnx.split(abstract_model(cfg))
    return graphdef, tuple(nnx.to_flat_state(abstract))


def sampling_split(model, *, unroll: bool | None = None):
    """(graphdef, state, config) to sample with: the model's own, or for a scanned model (up to
    UNROLL_MAX_BYTES of params, or whenever unroll=True) the same numbers as an unrolled model,
    each layer's params sliced from the stack. Models with layer groups (Gemma 4), and layouts
    this does not know (a leaf whose shape differs), stay as they are."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    if not cfg.scan_layers or cfg.grouped_layers or cfg.layer_specs() is not None or unroll is False:
        return graphdef, state, cfg
    source = list(nnx.to_flat_state(state))
    if unroll is None and sum(v.get_value().nbytes for _, v in source) > UNROLL_MAX_BYTES:
        return graphdef, state, cfg
    index = {path: k for k, (path, _) in enumerate(source)}
    unrolled_cfg = cfg.replace(scan_layers=False)
    unrolled_graphdef, target = _unrolled_layout(unrolled_cfg)
    plan = []  # per unrolled leaf: (its scanned leaf, the layer to take or -1)
    for path, v in target:
        layer = len(path) > 1 and path[0] == "layers" and isinstance(path[1], int)
        k = index.get(("layers",) + path[2:] if layer else path)
        shape = None if k is None else source[k][1].get_value().shape[1 if layer else 0:]
        if shape != v.get_value().shape:
            return graphdef, state, cfg
        plan.append((k, path[1] if layer else -1))
    values = _unstack([v.get_value() for _, v in source], tuple(plan))
    state = nnx.from_flat_state([(path, v.replace(value=x)) for (path, v), x in zip(target, values)])
    return unrolled_graphdef, state, unrolled_cfg


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class _Unit:
    """A prompt and a group of its samples: rows `samples` of prompt `prompt`."""

    prompt: int
    samples: range


def _batch_mesh(mesh):
    """(the mesh to run under or None, whether the params must be placed on it)."""
    if mesh is not None:
        return mesh, True
    ambient = sharding.current_mesh()
    if ambient is not None:
        return None, False  # the caller's mesh and shardings, as they are
    if jax.device_count() > 1:
        return sharding.make_mesh(data=-1), True
    return None, False


def _row_multiple(mesh) -> int:
    """Rows must split evenly over the batch axes of the mesh in use."""
    mesh = mesh if mesh is not None else sharding.current_mesh()
    if mesh is None:
        return 1
    return int(np.prod([sharding.axis_size(mesh, a) for a in sharding.mesh_axes("act_batch")]))


def sample_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    samples: int = 1,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int] = (),
    stop_check: Callable[[list[int]], bool] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    cache_dtype=None,
    prompt_bucket: int = PROMPT_BUCKET,
    chunk: int = CHUNK,
    mesh=None,
    progress: bool = False,
    unroll: bool | None = None,
) -> list[list[list[int]]]:
    """Token-level sampler: out[i][j] = the new tokens of sample j of prompt i, every token
    sampled (through max_new_tokens, or as far as the row ran before it was stopped): rows are
    cut by the caller (`finish`). A row stops on device at its first token in `eos_ids`, and on
    the host between chunks when `stop_check(tokens so far)` is true. See the module docstring
    for batching and seeds; `mesh` overrides the mesh the rows are split over; `unroll`:
    `sampling_split`'s (None = by size)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples and batch_size must be >= 1, got {samples=}, {batch_size=}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature=}, {top_p=}, "
                          f"{top_k=}")
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    if not prompt_ids or min(map(len, prompt_ids)) == 0:
        raise DataError("sampling needs at least one prompt and every prompt needs >= 1 token")
    eos_ids = list(eos_ids)
    if len(eos_ids) > MAX_EOS_IDS:
        raise ConfigError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos_ids)}")
    eos_arr = np.full((MAX_EOS_IDS,), -1, np.int32)  # -1: never sampled; a fixed shape for any count
    eos_arr[:len(eos_ids)] = eos_ids
    greedy = temperature == 0.0
    mode = _Mode(greedy=greedy, use_top_k=not greedy and top_k > 0, use_top_p=not greedy and top_p < 1.0)
    knobs = (jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
    cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype)

    group = min(samples, batch_size)
    units = [_Unit(i, range(s, min(s + group, samples))) for i in range(len(prompt_ids))
             for s in range(0, samples, group)]
    units.sort(key=lambda u: len(prompt_ids[u.prompt]))  # stable: ties keep input order
    run_mesh, replicate = _batch_mesh(mesh)
    rows_multiple = _row_multiple(run_mesh)
    per_batch = max(1, batch_size // group)
    # Batch shape: every batch has the same U (the last filled up with copies), and U x G rows
    # a multiple of the devices, so one program serves every batch of a bucket.
    while per_batch * group % rows_multiple:
        per_batch += 1
    if len(units) <= per_batch and rows_multiple == 1:
        per_batch = len(units)  # a single small batch: no filler rows
    graphdef, state, cfg = sampling_split(model, unroll=unroll)
    out: list[list[list[int] | None]] = [[None] * samples for _ in prompt_ids]
    bar = _progress_bar(len(prompt_ids) * samples * max_new_tokens) if progress else None
    with jax.set_mesh(run_mesh) if run_mesh is not None else contextlib.nullcontext():
        if replicate:  # by the rules table: replicated over "data", split where the mesh has fsdp / tensor
            state = jax.device_put(state, sharding.param_shardings(state, run_mesh))
        for start in range(0, len(units), per_batch):
            batch = units[start:start + per_batch]
            real = len(batch)
            batch = batch + [batch[0]] * (per_batch - real)
            rows = _run_batch(graphdef, state, [prompt_ids[u.prompt] for u in batch],
                              [(seed + j) for u in batch for j in _group_seeds(u, group)], group=group,
                              max_new_tokens=max_new_tokens, eos_arr=eos_arr, stop_check=stop_check, knobs=knobs,
                              mode=mode, cache_dtype=cache_dtype, prompt_bucket=prompt_bucket, chunk=chunk,
                              bar=bar, cfg=cfg, rows_multiple=rows_multiple, counted=[k < real and g < len(u.samples) for k, u in enumerate(batch)
                                                for g in range(group)])
            for u_index, unit in enumerate(batch[:real]):
                for g, j in enumerate(unit.samples):
                    out[unit.prompt][j] = rows[u_index * group + g]
    if bar is not None:
        bar.close()
    return out


def _group_seeds(unit: _Unit, group: int) -> list[int]:
    """Sample indices of a unit's G rows; a short last group repeats its last sample (discarded)."""
    js = list(unit.samples)
    return js + [js[-1]] * (group - len(js))


def _progress_bar(total: int):
    """Tokens sampled (of at most `total`) and tqdm's rate, tokens/s."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="sampling", dynamic_ncols=True)


def prompt_hash(ids: Sequence[int]) -> int:
    """A stable 31-bit hash of a prompt's token ids (CRC-32): decorrelates the samples of
    different prompts that share a seed."""
    return zlib.crc32(np.asarray(ids, np.int32).tobytes()) & 0x7FFFFFFF


@jax.jit
def _row_keys(seeds: Sequence[int], hashes: Sequence[int]) -> jax.Array:
    """Row r's key: fold_in(key(seeds[r]), hashes[r]); [R] typed keys."""
    return jax.vmap(lambda s, h: jax.random.fold_in(jax.random.key(s), h))(seeds, hashes)


def _host(x) -> np.ndarray:
    """x's value on this host. With several processes the rows are split over all of them, so
    each gathers the others' (a collective: every process samples the same prompts and reaches
    the same fetches in the same order)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _run_batch(graphdef, state, prompts, seeds, *, group, max_new_tokens, eos_arr, stop_check, knobs, mode,
               cache_dtype, prompt_bucket, chunk, bar, counted, cfg, rows_multiple) -> list[list[int]]:
    """Samples one batch of U prompts x G rows; returns each row's tokens as far as it ran.
    counted: [R] bools, the rows the progress bar counts (not the filler copies)."""
    U, N = len(prompts), max_new_tokens
    lengths = [len(p) for p in prompts]
    P = _round_up(max(lengths), prompt_bucket)
    tokens = np.zeros((U, P), np.int32)
    for u, ids in enumerate(prompts):
        tokens[u, P - len(ids):] = ids
    lengths_R = np.repeat(np.asarray(lengths, np.int32), group)
    keys_R = _row_keys(np.asarray(seeds, np.uint32),
                       np.asarray([prompt_hash(p) for p in prompts for _ in range(group)], np.uint32))
    carry = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), keys_R, knobs,
                     group=group, max_new_tokens=N, mode=mode, cache_dtype=cache_dtype)
    lengths_dev, eos_dev, prompt_len = jnp.asarray(lengths_R), jnp.asarray(eos_arr), jnp.int32(P)
    R = U * group
    results: list[list[int] | None] = [None] * R
    origin_R = np.arange(R)  # each current row's row in the batch; -1 = a filler copy
    counted_R = np.asarray(counted, bool)
    stopped_R = np.zeros(R, bool)  # stopped by the host (a stop string)
    done_R = np.zeros(R, bool)
    step = 1
    while True:
        carry = _decode(graphdef, state, carry, lengths_dev, keys_R, eos_dev, prompt_len,
                        jnp.int32(min(step + chunk, N)), knobs, mode=mode)
        new_step = int(_host(carry["step"]))
        live_R = ~done_R  # rows that were still sampling during this chunk
        done_R = _host(carry["done"]) | stopped_R
        if stop_check is not None:
            out_RN = _host(carry["out"])  # [R, N] int32: cheap, and no slice to compile
            for r in np.flatnonzero(~done_R):
                stopped_R[r] = stop_check(out_RN[r, :new_step].tolist())
            if stopped_R.any():
                carry = dict(carry, done=carry["done"] | jnp.asarray(stopped_R))
                done_R = done_R | stopped_R
        if bar is not None:
            bar.update(int((live_R & counted_R).sum()) * (new_step - step + (step == 1)))
        step = new_step
        if step >= N or done_R.all():
            break
        # Finished rows stop costing: when at most half the rows are live (and a chunk or more
        # is left), keep the live ones in a batch half the size (or a quarter, ...).
        live = np.flatnonzero(~done_R)
        size = len(done_R)
        while size % 2 == 0 and size // 2 >= len(live) and (size // 2) % rows_multiple == 0:
            size //= 2
        if size < len(done_R) and N - step >= chunk:
            out_RN = _host(carry["out"])
            for r in np.flatnonzero(done_R):
                if origin_R[r] >= 0:
                    results[origin_R[r]] = out_RN[r, :step].tolist()
            keep = np.concatenate([live, np.flatnonzero(done_R)[:size - len(live)]])  # fillers: done rows
            carry, lengths_dev, keys_R = _gather_rows(carry, lengths_dev, keys_R, jnp.asarray(keep, jnp.int32),
                                                      cfg=cfg)
            filler = np.arange(size) >= len(live)
            origin_R = np.where(filler, -1, origin_R[keep])
            counted_R, stopped_R, done_R = counted_R[keep] & ~filler, stopped_R[keep], done_R[keep]
    out_RN = _host(carry["out"])
    for r, origin in enumerate(origin_R):
        if origin >= 0:
            results[origin] = out_RN[r, :step].tolist()
    return results


# --- completions -------------------------------------------------------------------------------


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

    rows = sample_ids(model, ids, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, eos_ids=eos, stop_check=stop_check if stop else None, seed=seed,
                      batch_size=batch_size, progress=progress, **options)
    return [[finish(r, eos_ids=eos, stop=stop, decode=decode) for r in per_prompt] for per_prompt in rows]
