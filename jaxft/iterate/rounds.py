"""`jaxft iterate`: rounds of (sample K completions per prompt from the current policy, score them
with the rewards, build pairs, train a DPO (or rejection-sampling SFT) run on them, evaluate), each
round starting from the last one's export.

Everything a round makes is a file a user can read and reuse, and a rerun resumes from whatever
exists:

    DIR/round_0/eval.json                 the starting model on iterate.eval_prompts
    DIR/round_N/samples.jsonl             per prompt: its index, prompt, K completions, rewards
                                          (samples.partial.jsonl while sampling: whole prompts,
                                          appended a chunk at a time; a rerun continues it)
    DIR/round_N/pairs.jsonl, pairs.json   the training records and their counts
    DIR/round_N/train/                    the round's run (a run workdir: resumes, compares)
    DIR/round_N/eval.json                 the round's policy on iterate.eval_prompts
    DIR/rounds.json, DIR/hf               the per-round table; the final policy's export

The sampler is deterministic and independent of batching (`jaxft.inference.sampler`), so a
sampling pass continued after a kill writes what an uninterrupted one writes.

SIGTERM / Ctrl-C (`jaxft.iterate.stop`): in a round's step loop the run saves and exits 75 / 130
as any run does; anywhere else iterate stops at once (a chunk of samples being appended is
finished first) with the same exit codes, keeping every file already written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from jaxft.config import typed
from jaxft.errors import ConfigError
from jaxft.io import atomic
from jaxft.iterate.pairs import PAIR_MODES, build_pairs, prompt_of
from jaxft.iterate.stop import Stopper, deferred
from jaxft.loop.stop import Preempted
from jaxft.rewards import make_reward, parse_rewards

SAMPLE_CHUNK = 64  # prompts sampled (and saved) at a time


def check_iterate_config(config):
    """The iterate.* keys, named, before anything runs; returns the reward they describe (built
    once: a reward model loads its weights)."""
    it = typed(config).iterate
    model = typed(config).model
    problems = []
    if not model.path:
        problems.append("model.path: iterate starts from a Hugging Face folder (an SFT export: RUN/hf)")
    if not it.prompts:
        problems.append("iterate.prompts: the prompt records to sample from")
    if it.rounds < 1:
        problems.append(f"iterate.rounds must be >= 1, got {it.rounds}")
    if it.pairs not in PAIR_MODES:
        problems.append(f"iterate.pairs must be one of {', '.join(PAIR_MODES)}, got {it.pairs!r}")
    if it.samples < (2 if it.pairs == "best_worst" else 1):
        problems.append(f"iterate.samples must be >= 2 for best-vs-worst pairs, got {it.samples}")
    if it.temperature <= 0 or not 0 < it.top_p <= 1 or it.max_new_tokens < 1:
        problems.append("iterate.temperature must be > 0, iterate.top_p in (0, 1], iterate.max_new_tokens >= 1")
    if it.reference not in ("round", "start"):
        problems.append(f'iterate.reference must be "round" or "start", got {it.reference!r}')
    if it.prompts_per_round < 0:
        problems.append(f"iterate.prompts_per_round must be >= 0, got {it.prompts_per_round}")
    if it.pairs_per_prompt < 1:
        problems.append(f"iterate.pairs_per_prompt must be >= 1, got {it.pairs_per_prompt}")
    if typed(config).lora.base_quantization != "none":
        problems.append("lora.base_quantization: a QLoRA run exports no full model for the next round to start "
                        "from; iterate with lora.rank (LoRA, merged on export) or full fine-tuning")
    if problems:
        raise ConfigError("; ".join(problems))
    reward = make_reward(parse_rewards(it.rewards), key="iterate.rewards")  # unknown kinds, bad options
    # What each round's run would refuse, refused before the first sampling pass.
    from jaxft.config import validate
    from jaxft.parallel.sharding import check_batch_divisibility, mesh_from_config
    from jaxft.tasks import get_task

    round_config_ = round_config(config, it, pairs_file=Path(it.prompts))
    task_type = get_task(round_kind(it))
    typed_round = validate(round_config_)
    task_type.validate(typed_round)
    check_batch_divisibility(typed_round, mesh_from_config(typed_round),
                             rows_per_example=task_type.rows_per_example(typed_round))
    if typed_round.train.steps > 0:  # (epochs: the step count waits for the round's pairs)
        from jaxft.steps.optimizer import optimizer_from_config

        optimizer_from_config(typed_round.optim, typed_round.train.steps)
    return reward


def round_kind(it) -> str:
    return "dpo" if it.pairs == "best_worst" else "sft"


def read_prompt_records(source: str, key: str) -> list[dict]:
    """Prompt records of `source` (each with a prompt), errors naming `key`, the file and line."""
    from jaxft.data.data_error import DataError
    from jaxft.data.sources import read_records

    records = []
    for location, record in read_records(source):
        if isinstance(record, Exception):
            raise record
        try:
            prompt_of(record)
        except ValueError as err:
            raise DataError(location, f"{err} ({key})") from None
        records.append(record)
    if not records:
        raise DataError(source, f"no records ({key})")
    return records


def round_prompts(records: list[dict], it, round_index: int) -> list[tuple[int, dict]]:
    """(index, record) of the prompts round `round_index` (1-based) samples."""
    n = it.prompts_per_round or len(records)
    start = (round_index - 1) * n
    return [((start + i) % len(records), records[(start + i) % len(records)]) for i in range(min(n, len(records)))]


def _read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of `path` (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for line in lines[:-1]:  # the last piece has no newline: complete only if empty
        if line.strip():
            out.append(json.loads(line))
    return out


def sample_and_score(policy_dir, prompts: list[tuple[int, dict]], out: Path, it, reward, *, seed: int,
                     batch_size: int, log=print, stop: Stopper | None = None) -> list[dict]:
    """DIR/round_N/samples.jsonl: K completions of each prompt and their rewards; continues a
    partial file left by a kill (whole prompts only) and returns every line.
    stop: iterate's signal handler; a chunk's lines are appended whole (a signal waits for the
    write; one during the chunk's sampling or scoring drops the chunk), and its message says
    how many prompts are saved."""
    if out.exists():
        return _read_lines(out)
    from jaxft.inference.generate import load_folder
    from jaxft.inference.completions import sample_completions

    partial = out.with_name(out.stem + ".partial.jsonl")
    done = _read_lines(partial)
    if done:  # drop a torn last line before appending
        atomic.write_text(partial, "".join(json.dumps(r) + "\n" for r in done))
        log(f"  sampling resumes after {len(done)} of {len(prompts)} prompts")
    stage = stop.where if stop is not None else ""

    def saved(n: int) -> None:
        if stop is not None:
            stop.where = f"{stage} ({n} of {len(prompts)} prompts' samples saved in {partial})"

    saved(len(done))
    if len(done) < len(prompts):
        model, tokenizer = load_folder(str(policy_dir), flag="model.path")
        with partial.open("a", encoding="utf-8") as f:
            for start in range(len(done), len(prompts), SAMPLE_CHUNK):
                chunk = prompts[start:start + SAMPLE_CHUNK]
                records = [r for _, r in chunk]
                completions = sample_completions(
                    model, tokenizer, [prompt_of(r) for r in records], samples=it.samples,
                    max_new_tokens=it.max_new_tokens, temperature=it.temperature, top_p=it.top_p, seed=seed,
                    batch_size=batch_size)
                texts = [[c.text for c in row] for row in completions]
                scores = reward(records, texts)
                with deferred(stop):
                    for i, ((index, record), row) in enumerate(zip(chunk, texts)):
                        line = {"prompt_index": index, "prompt": prompt_of(record), "completions": row,
                                "rewards": {k: v[i].tolist() for k, v in scores.items()}}
                        f.write(json.dumps(line) + "\n")
                    f.flush()
                    saved(start + len(chunk))
    lines = _read_lines(partial)
    partial.replace(out)
    return lines


def evaluate_policy(policy_dir, records: list[dict], reward, *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers to held-out prompts, scored by the rewards (each term's mean) and by the
    repetition ratio."""
    from jaxft.eval.metrics import repetition_ratio
    from jaxft.inference.generate import load_folder
    from jaxft.inference.completions import sample_completions

    model, tokenizer = load_folder(str(policy_dir), flag="model.path")
    completions = sample_completions(model, tokenizer, [prompt_of(r) for r in records], samples=1,
                                     max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    texts = [[row[0].text] for row in completions]
    scores = reward(records, texts)
    out = {f"eval_{k}": float(np.mean(v)) for k, v in scores.items()}
    out["eval_repetition_ratio"] = repetition_ratio([t[0] for t in texts])
    out["eval_prompts"] = len(records)
    return out


def round_config(config, it, *, pairs_file: Path, policy: str | None = None, start: str | None = None):
    """The round's run config: the user's DPO (or SFT) settings on this round's pairs, from the
    round's starting policy (default: model.path); the reference is that policy or the first
    model (`start`, default model.path)."""
    import copy

    c = copy.deepcopy(config)
    start = start or c.model.path
    c.model.path = policy or c.model.path
    c.data.train = str(pairs_file)
    if it.pairs == "best_worst":
        c.dpo.reference = "policy" if it.reference == "round" else start
    return c


def _mean_reward(lines: list[dict]) -> float:
    return float(np.mean([np.mean(line["rewards"]["reward"]) for line in lines])) if lines else 0.0


def format_rounds(rows: list[dict]) -> str:
    keys = sorted({k for row in rows for k in row
                   if k.startswith("eval_") and k not in ("eval_prompts", "eval_seconds")})
    head = ["round", "records", "ties dropped", "sample reward"] + [k.removeprefix("eval_") for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["round"]), str(row.get("pairs", row.get("accepted", ""))), str(row.get("dropped_ties", "")),
                 f"{row['sample_reward']:.3f}" if "sample_reward" in row else ""]
        cells += [f"{row[k]:.3f}" if k in row else "" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def iterate(config, workdir: str | Path, *, log=print) -> list[dict]:
    """Runs (or resumes) every round of `config` (a DPO / SFT config with an iterate section) in
    `workdir`; returns the per-round rows (also DIR/rounds.json) and exports the final policy
    to DIR/hf. SIGTERM / Ctrl-C: `jaxft.iterate.stop` (raises a `Preempted`; rerun to resume)."""
    stop = Stopper()
    with stop.installed():
        return _iterate(config, workdir, stop, log)


def _iterate(config, workdir, stop: Stopper, log) -> list[dict]:
    from jaxft.io.checkpoint import workdir_path

    reward = check_iterate_config(config)
    it, cfg = typed(config).iterate, typed(config)
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = read_prompt_records(it.prompts, "iterate.prompts")
    held_out = read_prompt_records(it.eval_prompts, "iterate.eval_prompts") if it.eval_prompts else None
    batch_size = max(1, cfg.data.eval_batch_size or cfg.train.batch_size)
    start = policy = str(Path(cfg.model.path).expanduser().absolute())

    def evaluate(folder, rd: Path, what: str) -> dict:
        """rd/eval.json: the policy in `folder` on the held-out prompts (computed once)."""
        if held_out is None:
            return {}
        path = rd / "eval.json"
        if not path.exists():
            stop.where = f"evaluating {what}"
            rd.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, json.dumps(evaluate_policy(folder, held_out, reward, max_new_tokens=it.max_new_tokens,
                                                               batch_size=batch_size), indent=2))
        return json.loads(path.read_text())

    rows = [{"round": 0, **evaluate(policy, workdir / "round_0", "the starting model (round 0)")}]
    for r in range(1, it.rounds + 1):
        rd = workdir / f"round_{r}"
        rd.mkdir(exist_ok=True)
        times = {}
        t = time.perf_counter()
        log(f"[round {r}/{it.rounds}] sampling {it.samples} completions per prompt from {policy}")
        stop.check()
        stop.where = f"sampling round {r}"
        lines = sample_and_score(policy, round_prompts(prompts, it, r), rd / "samples.jsonl", it, reward,
                                 seed=cfg.train.seed + 1000 * r, batch_size=batch_size, log=log, stop=stop)
        times["sample_seconds"] = time.perf_counter() - t
        stop.where = f"building round {r}'s pairs"
        counts = _round_records(rd, r, prompts, lines, it, log)
        t = time.perf_counter()
        policy = str(_train_round(config, it, rd, r, policy=policy, start=start, stop=stop))
        times["train_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        row = {"round": r, **counts, "sample_reward": _mean_reward(lines),
               **evaluate(policy, rd, f"round {r}'s policy")}
        times["eval_seconds"] = time.perf_counter() - t
        rows.append({**row, **times})
        atomic.write_text(workdir / "rounds.json", json.dumps(rows, indent=2))
        log(format_rounds(rows))
    final = workdir / "hf"
    stop.where = f"exporting the final policy to {final}"
    with atomic.replace_folder(final) as tmp:
        shutil.copytree(policy, tmp, dirs_exist_ok=True)
    log(f"final policy: {final}")
    return rows


def _round_records(rd: Path, r: int, prompts: list[dict], lines: list[dict], it, log) -> dict:
    """rd/pairs.jsonl (the round's training records, from its scored samples) and rd/pairs.json
    (their counts), built once; returns the counts. A round with no records is an error."""
    pairs_file = rd / "pairs.jsonl"
    if not (rd / "pairs.json").exists():
        records = [{**prompts[line["prompt_index"]]} for line in lines]
        records, counts = build_pairs(records, [line["completions"] for line in lines],
                                      [line["rewards"]["reward"] for line in lines], mode=it.pairs,
                                      min_margin=it.min_margin, pairs_per_prompt=it.pairs_per_prompt)
        atomic.write_text(pairs_file, "".join(json.dumps(p) + "\n" for p in records))
        atomic.write_text(rd / "pairs.json", json.dumps(counts, indent=2))
    counts = json.loads((rd / "pairs.json").read_text())
    made = counts.get("pairs", counts.get("accepted", 0))
    log(f"  {made} training records from {counts['prompts']} prompts ({counts['dropped_ties']} ties, "
        f"{counts['dropped_margin']} under the margin, {counts.get('dropped_empty', 0)} without enough "
        "non-empty samples dropped)")
    if not made:
        raise ConfigError(f"round {r}: every prompt's samples tie (or miss iterate.min_margin): no training "
                          f"records in {pairs_file}; sample more (iterate.samples), hotter "
                          "(iterate.temperature), or reward more finely (iterate.rewards)")
    return counts


def _train_round(config, it, rd: Path, r: int, *, policy: str, start: str, stop: Stopper) -> Path:
    """Round r's DPO (or SFT) run on rd/pairs.jsonl from `policy`, in rd/train (resumed from its
    last checkpoint; skipped once exported); returns its export, the next round's policy."""
    from jaxft.run import run

    export = rd / "train" / "hf"
    if (export / "config.json").exists():
        return export
    # The run's own handler replaces this one for its step loop (saves, then Preempted);
    # a signal it took in its last step (it finishes) stops iterate when it returns.
    stop.where = f"loading or exporting round {r}'s run {rd / 'train'} (it resumes from its last checkpoint)"
    try:
        with stop.watching(f"round {r}'s run {rd / 'train'} finished (it is complete and exported)"):
            run(round_config(config, it, pairs_file=rd / "pairs.jsonl", policy=policy, start=start), rd / "train",
                kind=round_kind(it))
    except Preempted as err:
        if not hasattr(err, "where"):  # the run's: "preempted: saved step N; rerun ..."
            err.args = (f"round {r}'s run {rd / 'train'}: {err}",)
        raise
    stop.check()
    return export
