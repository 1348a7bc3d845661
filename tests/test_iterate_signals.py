"""`jaxft iterate` stopped by SIGTERM / Ctrl-C mid-sampling and mid-training (issue 27): it exits
as a preempted run does (75 / 130, saying how to resume), and the reruns end with the files and
weights of an uninterrupted iterate. The signals are sent in process (os.kill of this process)
at exact points: after a chunk of samples, at a round's first training step."""

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from jaxft.config import load
from jaxft.io import checkpoint
from jaxft.iterate import rounds as rounds_lib
from jaxft.iterate.stop import StageInterrupted, StageStopped, Stopper
from jaxft.loop import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted
from tests.quickstart_subset import quickstart_head, tiny_model_folder
from tests.test_iterate import CONFIG, REWARDS

PROMPTS = 6


def iterate_config(tmp: Path):
    """test_iterate's tiny rounds (the same programs: compiled once per session), one round."""
    tiny_model_folder(tmp / "start")
    return load(f"{CONFIG}:tiny", {
        "model.path": str(tmp / "start"), "iterate.prompts": str(quickstart_head(tmp, "sft_train.jsonl", PROMPTS)),
        "iterate.eval_prompts": str(quickstart_head(tmp, "sft_eval.jsonl", 4)), "iterate.rounds": 1,
        "iterate.samples": 3, "iterate.max_new_tokens": 6, "iterate.rewards": REWARDS,
        "train.steps": 2, "train.batch_size": 4, "optim.warmup_steps": 0, "data.max_length": 64})


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iterate_signals")
    config = iterate_config(tmp)
    mp = pytest.MonkeyPatch()
    mp.setattr(rounds_lib, "SAMPLE_CHUNK", 2)  # as the interrupted one samples (the samples do not depend on it)
    try:
        rows = rounds_lib.iterate(config, tmp / "run", log=quiet)
    finally:
        mp.undo()
    return config, tmp / "run", rows


def params(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def checkpoint_steps(workdir: Path) -> list[int]:
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def test_a_stop_mid_sampling_and_mid_training_resumes_to_the_uninterrupted_files(uninterrupted, tmp_path,
                                                                                 monkeypatch, caplog):
    config, reference, rows = uninterrupted
    import jaxft.inference.completions as completions
    import jaxft.loop.core as core
    from jaxft.loop.hooks import Hook

    monkeypatch.setattr(rounds_lib, "SAMPLE_CHUNK", 2)
    real_sample, real_hooks = completions.sample_completions, core.default_hooks
    sampled, kill = [], {}  # the prompts of each sampling call; kill: {"chunk" | "step": signal}

    def sample(model, tokenizer, prompts, **kw):
        out = real_sample(model, tokenizer, prompts, **kw)
        if kw.get("temperature"):  # the round's sampling (evaluation is greedy)
            sampled.append(list(prompts))
            if "chunk" in kill and len(sampled) == kill["at_chunk"]:
                os.kill(os.getpid(), kill.pop("chunk"))  # lands here: this chunk is dropped
        return out

    def hooks(*a, **k):
        run_hooks = real_hooks(*a, **k)

        def at_step(info):
            if info.step == kill.get("at_step"):
                os.kill(os.getpid(), kill.pop("step"))  # before the run's Preemption hook asks
                del kill["at_step"]

        run_hooks.hooks.insert(0, Hook(at_step, every=1))
        return run_hooks

    monkeypatch.setattr(completions, "sample_completions", sample)
    monkeypatch.setattr(core, "default_hooks", hooks)
    work, rd = tmp_path / "run", tmp_path / "run" / "round_1"
    full = (reference / "round_1" / "samples.jsonl").read_text().splitlines(keepends=True)
    partial = rd / "samples.partial.jsonl"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    # 1. SIGTERM while the second chunk samples: the first chunk's two prompts stay, exit 75.
    kill.update(chunk=signal.SIGTERM, at_chunk=2)
    with pytest.raises(StageStopped) as stopped:
        rounds_lib.iterate(config, work, log=quiet)
    assert stopped.value.exit_code == EXIT_PREEMPTED and not isinstance(stopped.value, StageInterrupted)
    assert str(stopped.value) == (f"preempted while sampling round 1 (2 of {PROMPTS} prompts' samples saved in "
                                  f"{partial}); rerun the same command to resume")
    assert partial.read_text() == "".join(full[:2]) and not (rd / "samples.jsonl").exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # iterate's handler is put back

    # 2. Ctrl-C in the rerun's second chunk: it sampled prompts 3-4 only, kept them, exit 130.
    sampled.clear()
    kill.update(chunk=signal.SIGINT, at_chunk=2)
    with pytest.raises(StageInterrupted) as interrupted:
        rounds_lib.iterate(config, work, log=quiet)
    assert interrupted.value.exit_code == EXIT_INTERRUPTED
    assert f"(4 of {PROMPTS} prompts' samples saved" in str(interrupted.value)
    prompt_texts = [json.loads(line)["prompt"] for line in full]
    assert sampled == [prompt_texts[2:4], prompt_texts[4:6]]
    assert partial.read_text() == "".join(full[:4])

    # 3. SIGTERM at the round's first training step: the run saves step 1 and exits 75.
    sampled.clear()
    kill.update(step=signal.SIGTERM, at_step=1)
    with pytest.raises(Preempted) as preempted:
        rounds_lib.iterate(config, work, log=quiet)
    assert preempted.value.exit_code == EXIT_PREEMPTED
    assert str(preempted.value) == (f"round 1's run {rd / 'train'}: preempted: saved step 1; rerun the same "
                                    "command to resume")
    assert sampled == [prompt_texts[4:6]]
    assert (rd / "samples.jsonl").read_text() == "".join(full)
    assert not (rd / "train" / "hf").exists()
    assert checkpoint_steps(rd / "train") == [1]

    # 4. The rerun resumes the run at step 1; SIGTERM at its last step: the run finishes (a
    # run's last step does not stop), then iterate stops before evaluating it, exit 75.
    sampled.clear()
    kill.update(step=signal.SIGTERM, at_step=2)
    with caplog.at_level(logging.INFO, logger="jaxft"), pytest.raises(StageStopped) as finished:
        rounds_lib.iterate(config, work, log=quiet)
    assert any(r.getMessage() == f"resumed {rd / 'train'} at step 1" for r in caplog.records)
    assert str(finished.value) == (f"preempted while round 1's run {rd / 'train'} finished (it is complete and "
                                   "exported); rerun the same command to resume")
    assert (rd / "train" / "hf" / "config.json").exists() and not (rd / "eval.json").exists()

    # 5. The rerun evaluates and exports: what an uninterrupted iterate makes.
    again = rounds_lib.iterate(config, work, log=quiet)
    assert sampled == [] and "at_step" not in kill
    for name in ("samples.jsonl", "pairs.jsonl", "pairs.json", "eval.json"):
        assert (rd / name).read_bytes() == (reference / "round_1" / name).read_bytes(), name
    assert checkpoint_steps(rd / "train") == [1, 2]

    def table(rows_):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows_]

    assert table(again) == table(rows)
    final, expected = params(work / "hf"), params(reference / "hf")
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[k], expected[k]) for k in expected)
    start = params(Path(config.model.path))
    assert any(not np.array_equal(final[k], start[k]) for k in start)  # trained: the check can fail


def test_a_signal_in_a_deferred_section_stops_at_its_end():
    """The append of a chunk of samples is not cut: the stop comes when it ends (a second
    SIGTERM is ignored); outside such a section the signal stops at once."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = Stopper()
    stop.where = "writing"
    written = []
    with pytest.raises(StageStopped, match="^preempted while writing; rerun the same command to resume$"):
        with stop.installed(), stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            written.append(1)
    assert written == [1]
    stop = Stopper()
    with pytest.raises(StageInterrupted) as interrupted:
        with stop.installed():
            os.kill(os.getpid(), signal.SIGINT)
            written.append(2)
    assert written == [1] and interrupted.value.exit_code == EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
