"""`jaxft bench` and `jaxft plan`: step throughput measured here, memory and time of a step planned
for a TPU slice."""

from __future__ import annotations

import argparse
import os

import jaxft.config
from jaxft.cli.common import _config_flags, _split_config_args
from jaxft.io import atomic


def _bench(argv):
    if "--iterate" in argv:
        return _bench_iterate([arg for arg in argv if arg != "--iterate"])
    if "--gated-deltanet" in argv:
        return _bench_gated_deltanet([arg for arg in argv if arg != "--gated-deltanet"])
    from jaxft.models.presets import PRESETS

    p = argparse.ArgumentParser(prog="jaxft bench", description=(
        "SFT and DPO step throughput on the same tokens, measured side by side in one process "
        "(interleaved rounds, best of each), with the settings of configs/sft.py and configs/dpo.py "
        "without a preset (compute dtype, remat, attention, loss chunk) on right-padded rows; "
        "--compare torch / tunix times transformers + PyTorch / Tunix too"))
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), metavar="PRESET",
                   help=f"model architecture: {', '.join(PRESETS)} (real shapes: smollm2_135m, "
                        "llama3_vocab_2x64 for a 128k vocabulary, gemma3_270m for Gemma 3's 262k; default tiny, "
                        "smollm2_135m with --generate)")
    p.add_argument("--batch-size", type=int, default=None, help="rows (= 2 x DPO pairs; default 8, 16 with --generate)")
    p.add_argument("--lengths", "--length", default="256",
                   help="comma-separated sequence lengths, e.g. 256,1024,2048 (cost growth)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed round (default: 1-5 per step kind, about a second a round)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="train.loss_chunk_size of the sft and dpo steps: -1 auto, 0 whole logits, > 0 tokens "
                        "(default: the configs' own)")
    p.add_argument("--compute-dtype", default=None, help="model.compute_dtype (default: the configs' own)")
    p.add_argument("--remat", default=None, help="model.remat: none, full, dots, ... (default: the configs' own)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smaller real models)")
    p.add_argument("--attention", default=None,
                   help="attention backend (model.attention: auto, reference, blockwise, xla, ...; "
                        "default: the configs' own)")
    p.add_argument("--compare", action="append", default=[], choices=("torch", "tunix"),
                   help="also time the same steps in transformers + PyTorch (torch) or Tunix (tunix); repeatable")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also time LoRA steps of this rank (SFT, and DPO with the adapters-off reference)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    g = p.add_argument_group("--generate: sampler throughput (jaxft.perf.bench_generate) instead of steps")
    g.add_argument("--generate", action="store_true", help="time jaxft's sampler (and, with --compare torch, "
                   "transformers' generate) on the same weights and prompts")
    g.add_argument("--new-tokens", type=int, default=256, help="tokens sampled per row (no EOS)")
    g.add_argument("--prompt-length", type=int, default=64, help="longest prompt (they range down to half)")
    g.add_argument("--dtype", default="float32", help="weights and compute dtype of both models")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--iterate", action="store_true", help="a round of jaxft iterate against the offline run on its "
                   "pairs + one generation pass: jaxft bench --iterate --config configs/iterate.py:tiny "
                   "--config.model.path=SFT_DIR (jaxft.perf.bench_iterate)")
    p.add_argument("--gated-deltanet", action="store_true", help="Gated DeltaNet's chunked rule against the "
                   "step-by-step one (jaxft.perf.bench_gated_deltanet; jaxft bench --gated-deltanet --help)")
    a = p.parse_args(argv)
    if a.generate:
        return _bench_generate(a)
    a.preset, a.batch_size = a.preset or "tiny", a.batch_size or 8
    try:
        lengths = [int(n) for n in a.lengths.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"jaxft bench: --lengths {a.lengths!r} must be comma-separated integers") from None

    from jaxft.perf.bench import format_bench, run_bench
    from jaxft.models.config import parse_dtype

    overrides = {"num_layers": a.layers} if a.layers else None
    report = run_bench(preset=a.preset, batch_size=a.batch_size, lengths=lengths, steps=a.steps, rounds=a.rounds,
                       chunk_size=a.chunk_size, overrides=overrides, attention=a.attention, remat=a.remat,
                       compare=a.compare,
                       compute_dtype=parse_dtype(a.compute_dtype, key="--compute-dtype"), lora_rank=a.lora)
    _report(format_bench(report), report, a.json)


def _report(text: str, report: dict, json_path: str | None) -> None:
    """Prints a bench's table; with --json also writes its numbers."""
    import json

    print(text)
    if json_path:
        atomic.write_text(json_path, json.dumps(report, indent=2))


def _bench_generate(a):
    from jaxft.perf.bench_generate import format_generate_bench, run_generate_bench

    report = run_generate_bench(preset=a.preset or "smollm2_135m", batch_size=a.batch_size or 16,
                                new_tokens=a.new_tokens, prompt_length=a.prompt_length, rounds=a.rounds, dtype=a.dtype,
                                temperature=a.temperature, layers=a.layers, compare=a.compare)
    _report(format_generate_bench(report), report, a.json)


def _bench_iterate(argv):
    config_args, argv = _split_config_args(argv)
    p = argparse.ArgumentParser(prog="jaxft bench --iterate", description=(
        "what a round of jaxft iterate costs: the round, the offline run on its pairs and one generation "
        "pass, timed side by side in one process (jaxft.perf.bench_iterate)"))
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args(argv)
    if not config_args:
        raise SystemExit("jaxft bench --iterate: --config configs/iterate.py[:preset] --config.model.path=DIR is required")

    from jaxft.perf.bench_iterate import format_iterate_bench, run_iterate_bench

    report = run_iterate_bench(_config_flags(config_args, "jaxft bench --iterate", workdir=False).config)
    _report(format_iterate_bench(report), report, a.json)


def _bench_gated_deltanet(argv):
    p = argparse.ArgumentParser(prog="jaxft bench --gated-deltanet", description=(
        "Qwen3.5's linear attention: the chunked gated delta rule against the step-by-step one, forward and "
        "forward + backward, side by side in one process (jaxft.perf.bench_gated_deltanet)"))
    p.add_argument("--lengths", default="2048,4096,8192", help="comma-separated sequence lengths (batch 1)")
    p.add_argument("--heads", default="16,32", help="query/key heads,value heads (Qwen3.5: 16,32)")
    p.add_argument("--head-dim", type=int, default=128, help="key and value head dim (Qwen3.5: 128)")
    p.add_argument("--chunk-sizes", default="32,16,64,128", help="chunk sizes to time; the first is the one compared")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    p.add_argument("--reference-backward-max", type=int, default=4096,
                   help="longest T whose step-by-step backward runs (it keeps a state per token: "
                        "8.6 GiB at 4,096 tokens and Qwen3.5's heads); it also runs only where it "
                        "fits 70%% of the free memory")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args(argv)
    try:
        lengths, heads, chunks = ([int(n) for n in text.split(",") if n.strip()]
                                  for text in (a.lengths, a.heads, a.chunk_sizes))
    except ValueError:
        raise SystemExit("jaxft bench --gated-deltanet: --lengths, --heads and --chunk-sizes take "
                         "comma-separated integers") from None
    if len(heads) != 2:
        raise SystemExit(f"jaxft bench --gated-deltanet: --heads {a.heads!r} must be two integers: KEY,VALUE")

    from jaxft.perf.bench_gated_deltanet import format_gated_deltanet_bench, run_gated_deltanet_bench

    report = run_gated_deltanet_bench(lengths=lengths, key_heads=heads[0], value_heads=heads[1],
                                      head_dim=a.head_dim, chunk_sizes=chunks, rounds=a.rounds,
                                      reference_backward_max=a.reference_backward_max)
    _report(format_gated_deltanet_bench(report), report, a.json)


def _plan(argv):
    config_args, argv = _split_config_args(argv)
    p = argparse.ArgumentParser(prog="jaxft plan", description=(
        "per-device memory and time of one training step of --config configs/NAME.py[:preset] "
        "[--config.KEY=VALUE ...] on a TPU slice, compiled ahead of time on this machine through "
        "libtpu (nothing allocated, nothing run); GPU targets get an analytic estimate"))
    p.add_argument("--target", required=True, help="v4-32, v5p-8, v5p-64, v5e-16, v6e-256, 8xH100, ...")
    p.add_argument("--kind", choices=("sft", "dpo"), default="sft")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args(argv)
    if not config_args:
        raise SystemExit("jaxft plan: --config configs/NAME.py[:preset] is required")
    # Nothing executes: keep JAX off local accelerators (a TPU VM's chips may be training).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # typed, not validated: a plan of configs/sft.py:llama3_8b has no data.train
    config = jaxft.config.typed(_config_flags(config_args, "jaxft plan", workdir=False).config)
    import json

    from jaxft.perf.plan import format_plan, plan

    result = plan(config, target=a.target, kind=a.kind)
    print(format_plan(result))
    if a.json:
        atomic.write_text(a.json, json.dumps(result.to_json(), indent=2))
