"""The sampler for evaluation and rollouts: k samples per prompt from one prefill, stop strings,
per-row seeds, length buckets, data-parallel rows.

Text in and completions out: `jaxft.inference.completions`. Here the token-level loop; its
compiled programs are in `decode_programs`, the choice of each token in `logits`, and scanned
models are sampled unrolled (`unrolled`).

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
`completions.sample_completions([prompt_i], samples=1, seed=seed + j)[0][0]` whatever the batching (up to
floating-point differences of the forward between batch shapes, which the tests do not see on
CPU). Greedy decoding (temperature 0) ignores the keys: its k samples are identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError, DataError
from jaxft.inference.decode_programs import decode, gather_rows, prefill
from jaxft.inference.logits import Mode
from jaxft.inference.unrolled import sampling_split
from jaxft.parallel import sharding

PROMPT_BUCKET = 32  # prompt lengths round up to this, so few prompt shapes ever compile
CHUNK = 32  # decode steps between host checks (stop strings, progress, compaction)
MAX_EOS_IDS = 8  # EOS ids travel in a fixed-size array (Llama 3 has 3, Qwen 2)


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


@dataclasses.dataclass(frozen=True)
class _Decoding:
    """How every batch of a call decodes (checked by `_decoding`)."""

    max_new_tokens: int
    eos_arr: np.ndarray  # [MAX_EOS_IDS] int32, -1 padded
    stop_check: Callable[[list[int]], bool] | None
    knobs: tuple  # (temperature, top_k, top_p) as device scalars
    mode: Mode
    cache_dtype: object
    prompt_bucket: int
    chunk: int


def _decoding(*, max_new_tokens, temperature, top_p, top_k, eos_ids, stop_check, cache_dtype, prompt_bucket,
              chunk) -> _Decoding:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature=}, {top_p=}, "
                          f"{top_k=}")
    eos_ids = list(eos_ids)
    if len(eos_ids) > MAX_EOS_IDS:
        raise ConfigError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos_ids)}")
    eos_arr = np.full((MAX_EOS_IDS,), -1, np.int32)  # -1: never sampled; a fixed shape for any count
    eos_arr[:len(eos_ids)] = eos_ids
    greedy = temperature == 0.0
    return _Decoding(
        max_new_tokens=max_new_tokens, eos_arr=eos_arr, stop_check=stop_check,
        knobs=(jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p)),
        mode=Mode(greedy=greedy, use_top_k=not greedy and top_k > 0, use_top_p=not greedy and top_p < 1.0),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype), prompt_bucket=prompt_bucket,
        chunk=chunk)


def _plan_batches(prompt_ids, samples: int, batch_size: int,
                  rows_multiple: int) -> tuple[int, list[tuple[list[_Unit], int]]]:
    """(G, [(a batch's units, how many of them are real)]): every prompt's samples in groups of
    G = min(samples, batch_size) rows, units sorted by prompt length (stable: ties keep input
    order) and cut into batches of the same U units, the last filled up with copies of its first;
    U x G rows a multiple of `rows_multiple`, so one program serves every batch of a prompt
    bucket. A single small batch gets no filler rows."""
    group = min(samples, batch_size)
    units = [_Unit(i, range(s, min(s + group, samples))) for i in range(len(prompt_ids))
             for s in range(0, samples, group)]
    units.sort(key=lambda u: len(prompt_ids[u.prompt]))
    per_batch = max(1, batch_size // group)
    while per_batch * group % rows_multiple:
        per_batch += 1
    if len(units) <= per_batch and rows_multiple == 1:
        per_batch = len(units)
    batches = [units[start:start + per_batch] for start in range(0, len(units), per_batch)]
    return group, [(b + [b[0]] * (per_batch - len(b)), len(b)) for b in batches]


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
    settings = _decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         eos_ids=eos_ids, stop_check=stop_check, cache_dtype=cache_dtype,
                         prompt_bucket=prompt_bucket, chunk=chunk)
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples and batch_size must be >= 1, got {samples=}, {batch_size=}")
    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    if not prompt_ids or min(map(len, prompt_ids)) == 0:
        raise DataError("sampling needs at least one prompt and every prompt needs >= 1 token")
    run_mesh, replicate = _batch_mesh(mesh)
    rows_multiple = _row_multiple(run_mesh)
    group, batches = _plan_batches(prompt_ids, samples, batch_size, rows_multiple)
    graphdef, state, cfg = sampling_split(model, unroll=unroll)
    out: list[list[list[int] | None]] = [[None] * samples for _ in prompt_ids]
    bar = _progress_bar(len(prompt_ids) * samples * max_new_tokens) if progress else None
    with jax.set_mesh(run_mesh) if run_mesh is not None else contextlib.nullcontext():
        if replicate:  # by the rules table: replicated over "data", split where the mesh has fsdp / tensor
            state = jax.device_put(state, sharding.param_shardings(state, run_mesh))
        for batch, real in batches:  # units past `real` are filler copies: neither counted nor kept
            rows = _run_batch(graphdef, state, [prompt_ids[u.prompt] for u in batch],
                              [(seed + j) for u in batch for j in _group_seeds(u, group)], group=group,
                              settings=settings, bar=bar, cfg=cfg, rows_multiple=rows_multiple,
                              counted=[k < real and g < len(u.samples) for k, u in enumerate(batch) for g in range(group)])
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


def _run_batch(graphdef, state, prompts, seeds, *, group, settings: _Decoding, bar, counted, cfg,
               rows_multiple) -> list[list[int]]:
    """Samples one batch of U prompts x G rows; returns each row's tokens as far as it ran.
    counted: [R] bools, the rows the progress bar counts (not the filler copies)."""
    U, N = len(prompts), settings.max_new_tokens
    knobs, mode, chunk, stop_check = settings.knobs, settings.mode, settings.chunk, settings.stop_check
    lengths = [len(p) for p in prompts]
    P = _round_up(max(lengths), settings.prompt_bucket)
    tokens = np.zeros((U, P), np.int32)
    for u, ids in enumerate(prompts):
        tokens[u, P - len(ids):] = ids
    lengths_R = np.repeat(np.asarray(lengths, np.int32), group)
    keys_R = _row_keys(np.asarray(seeds, np.uint32),
                       np.asarray([prompt_hash(p) for p in prompts for _ in range(group)], np.uint32))
    carry = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), keys_R, knobs,
                     group=group, max_new_tokens=N, mode=mode, cache_dtype=settings.cache_dtype)
    lengths_dev, eos_dev, prompt_len = jnp.asarray(lengths_R), jnp.asarray(settings.eos_arr), jnp.int32(P)
    R = U * group
    results: list[list[int] | None] = [None] * R
    origin_R = np.arange(R)  # each current row's row in the batch; -1 = a filler copy
    counted_R = np.asarray(counted, bool)
    stopped_R = np.zeros(R, bool)  # stopped by the host (a stop string)
    done_R = np.zeros(R, bool)
    step = 1
    while True:
        carry = decode(graphdef, state, carry, lengths_dev, keys_R, eos_dev, prompt_len,
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
            carry, lengths_dev, keys_R = gather_rows(carry, lengths_dev, keys_R, jnp.asarray(keep, jnp.int32),
                                                      cfg=cfg)
            filler = np.arange(size) >= len(live)
            origin_R = np.where(filler, -1, origin_R[keep])
            counted_R, stopped_R, done_R = counted_R[keep] & ~filler, stopped_R[keep], done_R[keep]
    out_RN = _host(carry["out"])
    for r, origin in enumerate(origin_R):
        if origin >= 0:
            results[origin] = out_RN[r, :step].tolist()
    return results


