"""`jaxft bench --iterate CONFIG`: what a round of `jaxft iterate` costs against the work it cannot
avoid, side by side in one process.

  round     one round of the config (sample K completions per prompt, score, pair, train the
            round's run, no evaluation), as `jaxft iterate` runs it
  offline   the same run on the same pairs file (`jaxft dpo` on pairs made elsewhere)
  generate  one sampling pass over the same prompts (K samples each, the same settings)

ratio = round / (offline + generate): the overhead of scoring, pairing and the round's
book-keeping; 1.0 is free. Each part starts with JAX's in-memory compilation caches cleared,
so each pays its compiles as a fresh command would.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path


def _timed(fn) -> float:
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_iterate_bench(config, *, workdir: str | Path | None = None, log=print) -> dict:
    """Times a round, the offline run on its pairs and a generation pass (see the module doc).
    `config`: an iterate config (ConfigDict), e.g. configs/iterate.py:tiny with model.path."""
    from jaxft.config import typed
    from jaxft.iterate import rounds
    from jaxft.run import run

    config = copy.deepcopy(config)
    config.iterate.rounds = 1
    config.iterate.eval_prompts = ""  # evaluation is not part of the round's cost
    rounds.check_iterate_config(config)
    it = typed(config).iterate
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        log("round: sample, score, pair, train")
        t_round = _timed(lambda: rounds.iterate(config, tmp / "iterate", log=lambda *a: None))
        pairs = tmp / "iterate" / "round_1" / "pairs.jsonl"
        offline = rounds.round_config(config, it, pairs_file=pairs)
        log("offline: the same run on the same pairs")
        t_offline = _timed(lambda: run(offline, tmp / "offline", kind=rounds.round_kind(it), export=True))
        prompts = rounds.round_prompts(rounds.read_prompt_records(it.prompts, "iterate.prompts"), it, 1)
        log("generate: one sampling pass over the same prompts")

        def generate():
            from jaxft.inference.generate import load_folder
            from jaxft.inference.completions import sample_completions
            from jaxft.iterate.pairs import prompt_of

            model, tokenizer = load_folder(typed(config).model.path, flag="model.path")
            sample_completions(model, tokenizer, [prompt_of(r) for _, r in prompts], samples=it.samples,
                               max_new_tokens=it.max_new_tokens, temperature=it.temperature, top_p=it.top_p,
                               seed=typed(config).train.seed + 1000,
                               batch_size=max(1, typed(config).data.eval_batch_size or typed(config).train.batch_size))

        t_generate = _timed(generate)
        counts = (tmp / "iterate" / "round_1" / "pairs.json").read_text()
    return {"prompts": len(prompts), "samples": it.samples, "pairs": counts, "round_seconds": t_round,
            "offline_seconds": t_offline, "generate_seconds": t_generate,
            "ratio": t_round / (t_offline + t_generate)}


def format_iterate_bench(report: dict) -> str:
    return "\n".join([
        f"iterate round cost: {report['prompts']} prompts x {report['samples']} samples",
        "| part | seconds |", "|---|---|",
        f"| round (sample, score, pair, train) | {report['round_seconds']:.1f} |",
        f"| offline run on the same pairs | {report['offline_seconds']:.1f} |",
        f"| one generation pass | {report['generate_seconds']:.1f} |",
        f"ratio round / (offline + generate): {report['ratio']:.2f} (target <= 1.5)",
    ])
