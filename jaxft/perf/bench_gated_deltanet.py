"""`jaxft bench --gated-deltanet`: Gated DeltaNet's chunked rule against the step-by-step one,
side by side in one process (jaxft.models.gated_deltanet).

One layer's linear attention at batch 1 with Qwen3.5's head shape by default (16 query/key heads,
32 value heads, head dims 128: a [32, 128, 128] state), random inputs with Qwen3.5-like gates
(beta = sigmoid(normal), g = -exp(A_log) softplus(a + 1), A in [1, 16]). For each length T:
  chunked    `gated_delta_rule` jitted, one run per chunk size asked (the first is the default)
  reference  `gated_delta_rule_reference` jitted: a `lax.scan` over T
forward, and forward + backward (the gradient of out.sum() + state.sum() w.r.t. q, k, v, g, beta)
for every chunk size and for the reference where its backward fits (`reference_backward_max`:
its checkpointed scan keeps a state per token, T x 2 MiB at this shape, 8.6 GiB at 4,096 tokens;
beyond it, or where XLA's planned temp bytes exceed 70% of the memory free on the device (the
host's available memory on CPU), those bytes are reported instead and it does not run). Rounds
interleave the variants, each round starting one later (the reference's backward runs its rounds
after the others), each variant called twice in its turn; the best call of each counts;
tokens/s = B x T / seconds. The report's lines: chunked / reference tokens/s at each T, and
chunked tokens/s at the longest T over the shortest (1.0 = linear in T).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Sequence

import numpy as np

from jaxft.errors import ConfigError

log = logging.getLogger(__name__)


def bench_inputs(T: int, *, key_heads: int, value_heads: int, head_dim: int, seed: int = 0):
    """q, k [1, T, G, D], v [1, T, H, D], g, beta [1, T, H] float32, gates shaped like Qwen3.5's."""
    import jax.numpy as jnp

    r = np.random.default_rng(seed)
    q, k = (r.normal(size=(1, T, key_heads, head_dim)) for _ in range(2))
    v = r.normal(size=(1, T, value_heads, head_dim))
    A = np.linspace(1.0, 16.0, value_heads)
    g = -A * np.log1p(np.exp(r.normal(size=(1, T, value_heads)) + 1.0))
    beta = 1 / (1 + np.exp(-r.normal(size=(1, T, value_heads))))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta))


def free_bytes() -> int | None:
    """Memory free for one more program: the device's (limit - in use) where it reports it (GPU,
    TPU), else the host's MemAvailable (Linux), else None (unknown: no guard)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _backward(rule):
    import jax
    import jax.numpy as jnp

    def loss(*args):
        out, state = rule(*args)
        return jnp.sum(out) + jnp.sum(state)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _timed(steps: dict, args, rounds: int, repeats: int = 2) -> dict:
    """Best (wall seconds, process CPU seconds) of each compiled step over `rounds` interleaved
    rounds, each round starting one step later (no step always follows the same one), a step
    running `repeats` times back to back in its turn: the first call after another step pays for
    that step's leftovers in the caches and the allocator (about 12% of the chunked forward at
    T = 2,048 after the reference or a backward), the repeat measures the step itself. CPU time,
    all of this process's threads, is what other jobs on the machine disturb least."""
    import jax

    best = {key: (float("inf"), float("inf")) for key in steps}
    order = list(steps)
    for r in range(rounds):
        for key in order[r % len(order):] + order[:r % len(order)] if order else ():
            for _ in range(repeats):
                start, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(steps[key](*args))
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
    return best


def run_gated_deltanet_bench(*, lengths: Sequence[int] = (2048, 4096, 8192), key_heads: int = 16,
                             value_heads: int = 32, head_dim: int = 128, chunk_sizes: Sequence[int] = (32, 16, 64, 128),
                             rounds: int = 3, reference_backward_max: int = 4096) -> dict:
    """Times the chunked and step-by-step rules; returns the JSON-able report

    {"lengths": {T: {"forward": {name: {"tokens_per_sec", "seconds", "first_call_s"}},
                     "backward": {...}, "backward_temp_mib": {name: MiB}}},
     "ratio_forward": {T: chunked (default chunk) / reference tokens/s}, "ratio_backward": {...},
     "linearity": {"tokens_per_sec" | "tokens_per_cpu_sec": chunked at the longest T / at the shortest},
     "config": {...}, "device": {...}}.
    The reference's backward (GiBs of states) is timed after the interleaved rounds, so that its
    allocations do not slow the others.
    """
    import jax

    from jaxft.models.gated_deltanet import gated_delta_rule, gated_delta_rule_reference

    if not lengths or min(lengths) < 1 or rounds < 1 or not chunk_sizes or min(chunk_sizes) < 1:
        raise ConfigError("jaxft bench --gated-deltanet: lengths, chunk sizes and rounds must be >= 1")
    if value_heads % key_heads:
        raise ConfigError(f"--heads: {value_heads} value heads are not a multiple of {key_heads} key heads")
    default = f"chunked {chunk_sizes[0]}"
    report = {"lengths": {}, "ratio_forward": {}, "ratio_backward": {}}
    for T in lengths:
        args = bench_inputs(T, key_heads=key_heads, value_heads=value_heads, head_dim=head_dim)
        rules = {f"chunked {c}": functools.partial(gated_delta_rule, chunk_size=c) for c in chunk_sizes}
        rules["reference"] = gated_delta_rule_reference
        result = {"forward": {}, "backward": {}, "backward_temp_mib": {}}
        steps, heavy = {}, {}
        for kind in ("forward", "backward"):
            for name, rule in rules.items():
                start = time.perf_counter()
                step = jax.jit(rule if kind == "forward" else _backward(rule)).lower(*args).compile()
                if kind == "backward":
                    temp = step.memory_analysis().temp_size_in_bytes
                    result["backward_temp_mib"][name] = temp / 2**20
                    if name == "reference" and (T > reference_backward_max or temp > 0.7 * (free_bytes() or math.inf)):
                        continue
                jax.block_until_ready(step(*args))
                result[kind][name] = {"first_call_s": time.perf_counter() - start}
                (heavy if (kind, name) == ("backward", "reference") else steps)[kind, name] = step
        best = _timed(steps, args, rounds) | _timed(heavy, args, rounds, repeats=1)
        for (kind, name), (seconds, cpu) in best.items():
            result[kind][name].update(seconds=seconds, tokens_per_sec=T / seconds, cpu_seconds=cpu,
                                      tokens_per_cpu_sec=T / cpu)
        for kind in ("forward", "backward"):
            if "reference" in result[kind]:
                report[f"ratio_{kind}"][T] = (result[kind][default]["tokens_per_sec"]
                                              / result[kind]["reference"]["tokens_per_sec"])
        report["lengths"][T] = result
        log.info("bench --gated-deltanet: T=%d done", T)
    first, last = report["lengths"][min(lengths)], report["lengths"][max(lengths)]
    report["linearity"] = {unit: last["forward"][default][unit] / first["forward"][default][unit]
                           for unit in ("tokens_per_sec", "tokens_per_cpu_sec")}
    device = jax.devices()[0]
    report["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    report["config"] = {"key_heads": key_heads, "value_heads": value_heads, "head_dim": head_dim, "batch_size": 1,
                        "chunk_sizes": list(chunk_sizes), "default": default, "rounds": rounds,
                        "reference_backward_max": reference_backward_max}
    return report


def format_gated_deltanet_bench(report: dict) -> str:
    """The report as Markdown: the setting, a tokens/s table per length, the ratios."""
    c, d = report["config"], report["device"]
    qwen = " (Qwen3.5's)" if (c["key_heads"], c["value_heads"], c["head_dim"]) == (16, 32, 128) else ""
    out = [f"Gated DeltaNet, one layer at batch 1: {c['key_heads']} q/k heads, {c['value_heads']} value heads, "
           f"head dims {c['head_dim']}{qwen}, float32, {d['count']} x {d['kind']}, "
           f"best of {c['rounds']} interleaved rounds of 2 calls; backward = forward + gradient w.r.t. q, k, v, g, beta",
           "", "| T | rule | forward tokens/s | forward tokens per CPU s | fwd+bwd tokens/s | fwd+bwd temp MiB (XLA) "
           "| compile + first call s (fwd) |", "|---|---|---|---|---|---|---|"]
    for T, r in report["lengths"].items():
        for name, fwd in r["forward"].items():
            bwd, temp = r["backward"].get(name), r["backward_temp_mib"].get(name)
            bwd_cell = f"{bwd['tokens_per_sec']:,.0f}" if bwd else ("not run" if temp is not None else "")
            temp_cell = f"{temp:,.0f}" if temp is not None else ""
            out.append(f"| {T} | {name} | {fwd['tokens_per_sec']:,.0f} | {fwd['tokens_per_cpu_sec']:,.0f} | "
                       f"{bwd_cell} | {temp_cell} | "
                       f"{fwd['first_call_s']:.1f} |")
    out.append("")
    for kind in ("forward", "backward"):
        ratios = ", ".join(f"T={T}: {x:.1f}x" for T, x in report[f"ratio_{kind}"].items())
        if ratios:
            out.append(f"{c['default']} / reference tokens/s, {kind}: {ratios}")
    for T, r in report["lengths"].items():
        fastest = {kind: max((n for n in r[kind] if n != "reference"), key=lambda n: r[kind][n]["tokens_per_sec"])
                   for kind in ("forward", "backward")}
        out.append(f"T={T}: fastest forward {fastest['forward']}, fastest fwd+bwd {fastest['backward']}")
    lengths = list(report["lengths"])
    out.append(f"{c['default']} forward tokens/s at T={max(lengths)} / at T={min(lengths)}: "
               f"{report['linearity']['tokens_per_sec']:.2f} in wall time, "
               f"{report['linearity']['tokens_per_cpu_sec']:.2f} in CPU time (1.0 = cost linear in T)")
    return "\n".join(out)
