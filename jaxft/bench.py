"""`jaxft bench`: step throughput measured side by side, on the same tokens, in one process.

Compares, on one batch of random tokens [B, L] (B rows = B/2 DPO pairs):
  sft               the SFT step
  sft_chunked_ce    the SFT step with chunked cross-entropy (train.loss_chunk_size)
  dpo_precomputed   the DPO step with a precomputed reference table (no reference forward)
  dpo_reference     the DPO step with a reference forward per step
and reports tokens/s, ms/step, MFU (on known accelerators) and each one's ratio to `sft`.
The target: dpo_precomputed <= 1.1 x sft.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.io.metrics import device_peak_flops, train_flops_per_token
from jaxft.models import create_model, get_preset
from jaxft.models.from_config import split_params
from jaxft.parallel import sharding
from jaxft.steps.common import jit_step
from jaxft.steps.dpo import jit_dpo_step, make_dpo_step
from jaxft.steps.optimizer import make_optimizer
from jaxft.steps.sft import make_sft_step
from jaxft.steps.state import create_train_state


def _batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    loss_mask = np.ones((rows, length), np.int32)
    loss_mask[:, : length // 4] = 0  # a prompt quarter
    pairs = rows // 2
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        "segment_ids": np.ones((rows, length), np.int32),
        "loss_mask": loss_mask,
        "chosen_row": np.arange(0, rows, 2, dtype=np.int32),
        "rejected_row": np.arange(1, rows, 2, dtype=np.int32),
        "chosen_segment": np.ones(pairs, np.int32),
        "rejected_segment": np.ones(pairs, np.int32),
        "pair_mask": np.ones(pairs, np.int32),
        "pair_index": np.arange(pairs, dtype=np.int32),
    }


def _time(fn, state, steps: int) -> tuple[float, dict]:
    """(seconds per step, the final state): steps donate their input state."""
    start = time.perf_counter()
    for _ in range(steps):
        state = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps, state


def run_bench(*, preset: str = "tiny", batch_size: int = 8, length: int = 256, steps: int = 5,
              rounds: int = 3, chunk_size: int = 128, compute_dtype=None, overrides: dict | None = None) -> dict:
    """Times each step kind; returns {name: {ms_per_step, tokens_per_sec, ratio_to_sft, mfu}}."""
    cfg = get_preset(preset).replace(**(overrides or {}))
    if compute_dtype is not None:
        cfg = cfg.replace(compute_dtype=compute_dtype)
    mesh = sharding.make_mesh(data=-1)
    rows_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    host = _batch(batch_size, length, cfg.vocab_size)
    results = {}
    with jax.set_mesh(mesh):
        model = create_model(cfg, seed=0, mesh=mesh)
        graphdef, params = split_params(model)
        tx, schedule = make_optimizer(lr=1e-5, schedule="constant", total_steps=steps + 1)
        reference = jax.tree.map(jnp.copy, params)
        state, shardings = create_train_state(params, tx, mesh)
        batch = {k: jax.device_put(v, rows_sharding if v.ndim == 2 else replicated) for k, v in host.items()}
        sft_batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
        table = jnp.zeros((batch_size // 2, 2), jnp.float32)

        cases = {}
        for name, chunk in (("sft", 0), ("sft_chunked_ce", chunk_size)):
            step = jit_step(make_sft_step(graphdef, tx, schedule, loss_chunk_size=chunk),
                            state_shardings=shardings, batch_sharding=rows_sharding)
            cases[name] = lambda s, step=step: step(s, sft_batch)[0]
        for name, mode, ref, ref_shardings in (
            ("dpo_precomputed", "table", table, replicated),
            ("dpo_reference", "params", reference, jax.tree.map(lambda x: x.sharding, reference)),
        ):
            step = jit_dpo_step(
                make_dpo_step(graphdef, tx, schedule, loss_kwargs={"loss_type": "sigmoid", "beta": 0.1},
                              reference_mode=mode, num_segments=1, rows_per_pair=2),
                state_shardings=shardings, reference_shardings=ref_shardings, mesh=mesh)
            cases[name] = lambda s, step=step, ref=ref: step(s, ref, batch)[0]

        peak = device_peak_flops()
        flops_per_token = train_flops_per_token(cfg, length)
        for fn in cases.values():  # compile everything first
            state = jax.block_until_ready(fn(state))
        # Interleaved rounds, best of each: a noisy neighbour slows every case alike.
        best = {name: float("inf") for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                seconds, state = _time(fn, state, steps)
                best[name] = min(best[name], seconds)
        for name, seconds in best.items():
            tokens_per_sec = batch_size * length / seconds
            results[name] = {"ms_per_step": 1000 * seconds, "tokens_per_sec": tokens_per_sec}
            if peak:
                results[name]["mfu"] = flops_per_token * tokens_per_sec / (peak * jax.device_count())
    for name in results:
        results[name]["ratio_to_sft"] = results[name]["ms_per_step"] / results["sft"]["ms_per_step"]
    return results


def format_bench(results: dict, header: str = "") -> str:
    lines = [header] if header else []
    lines += ["| step | ms/step | tokens/s | x sft | MFU |", "|---|---|---|---|---|"]
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['tokens_per_sec']:.0f} | "
                     f"{r['ratio_to_sft']:.2f} | {mfu} |")
    return "\n".join(lines)
