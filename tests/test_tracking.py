"""Experiment tracking (`train.report_to`) and sample generations (`train.sample_every`):
W&B offline writes a run with the config and final metrics, "none" and "tensorboard" write
what they say, a bad name fails before the workdir is touched, samples are the current model's
greedy answers (LoRA and DPO prompts included) and never change training, and W&B is
imported only when asked for."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from jaxft import config as config_lib, run as run_lib
from jaxft.data.tokenize import load_examples
from jaxft.eval.samples import Sampler
from jaxft.inference.generate import generate_text
from jaxft.io.metrics import read_metrics
from jaxft.io.trackers import WANDB_ID_FILE
from jaxft.models import load_hf
from jaxft.models.hf import abstract_model
from jaxft.models.lora import LoRAParam
from jaxft.parallel.sharding import make_mesh, param_shardings
from tests.quickstart_subset import quickstart_head, sft_data
from tests.test_lora import lora_of, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SMALL = {"train.steps": STEPS, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
         "train.log_every": 1, "train.save_every": 0, "optim.warmup_steps": 1, "mesh.data": -1}


def config_of(kind: str, data: dict, overrides: dict):
    return config_lib.load(f"{REPO}/configs/{kind}.py:tiny", {**SMALL, **data, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return sft_data(tmp_path_factory.mktemp("data"), 64, eval_lines=8)


@pytest.fixture(scope="module")
def untracked(data, tmp_path_factory) -> run_lib.RunResult:
    """report_to=none, no samples: the run the sampled one must reproduce."""
    return run_lib.run(config_of("sft", data, {"train.report_to": "none"}),
                       tmp_path_factory.mktemp("none"), export=False)


def losses(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log framed
    records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, part = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            yield record


@pytest.fixture(scope="module")
def tracked(data, tmp_path_factory) -> run_lib.RunResult:
    """The same run reported to TensorBoard and W&B (offline), sampling every 2 steps."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        return run_lib.run(config_of("sft", data, {"train.report_to": "tensorboard,wandb", "train.sample_every": 2,
                                                   "train.sample_prompts": 3, "train.sample_max_new_tokens": 8}),
                           tmp_path_factory.mktemp("tracked") / "tracked_run", export=True)


def test_report_to_wandb_offline_writes_a_run_with_the_config_and_final_metrics(data, tracked):
    workdir = tracked.workdir
    run_id = (workdir / WANDB_ID_FILE).read_text().strip()
    (folder,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    records = list(wandb_records(folder / f"run-{run_id}.wandb"))
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "config", "history", "summary", "exit"} <= kinds

    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("jaxft", "tracked_run")
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["train"]["report_to"] == "tensorboard,wandb" and config["train"]["steps"] == STEPS
    assert config["data"]["train"] == data["data.train"]

    # The final metrics (the last value of each) land in the run's summary at the end.
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
    last = [r for r in tracked.metrics if "loss" in r][-1]
    assert summary["loss"] == pytest.approx(last["loss"]) and summary["eval_loss"] == pytest.approx(last["eval_loss"])
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]
    # The samples went to W&B tables (one per sample step) as well as to metrics.jsonl.
    assert len(list((folder / "files" / "media" / "table").glob("samples_*.table.json"))) == 2


def test_report_to_none_writes_no_tensorboard_and_tensorboard_does(untracked, tracked):
    assert (untracked.workdir / "metrics.jsonl").is_file()
    assert not (untracked.workdir / "tensorboard").exists() and not (untracked.workdir / "wandb").exists()
    events = list((tracked.workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].read_bytes().count(b"samples") >= 2  # scalars and the samples' text


def test_samples_every_n_steps_are_the_current_model_and_leave_the_losses_unchanged(data, untracked, tracked):
    rows = read_metrics(tracked.workdir)
    assert tracked.metrics == rows
    samples = {r["step"]: r["samples"] for r in rows if "samples" in r}
    assert list(samples) == [2, 4]  # at sample_every steps and not otherwise
    assert [len(s) for s in samples.values()] == [3, 3]
    assert losses(rows) == losses(read_metrics(untracked.workdir))  # bit for bit

    # The last samples are what the final model (the export) answers to the first eval
    # prompts, sent as a user would (chat template with the generation prompt), greedily.
    records = [json.loads(line) for line in Path(data["data.eval"]).read_text().splitlines()[:3]]
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in records]
    tokenizer = AutoTokenizer.from_pretrained(tracked.export_dir)
    expected = generate_text(load_hf(tracked.export_dir), tokenizer, prompts, max_new_tokens=8)
    assert [s["completion"] for s in samples[STEPS]] == expected and all(expected)
    for sample, messages in zip(samples[STEPS], prompts):
        assert messages[-1]["content"] in sample["prompt"]


def test_lora_samples_on_sharded_weights_are_the_models_answers_to_dpo_prompts(tmp_path):
    # What a LoRA DPO run samples from: (adapters, frozen base) sharded over fsdp and tensor,
    # and preference examples, whose prompt is the chosen sequence's before its completion.
    cfg, tokenizer = tiny_cfg()
    path = quickstart_head(tmp_path, "pref_eval.jsonl", 3)
    pairs = load_examples(str(path), tokenizer, kind="dpo", max_length=64).examples
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    graphdef, *abstract = nnx.split(abstract_model(lora_of(cfg)), LoRAParam, nnx.Param)
    rng = np.random.default_rng(0)  # random weights, adapters far from zero: made on the host in no time
    weights = tuple(jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), nnx.to_pure_dict(a))
                    for a in abstract)
    shardings = tuple(nnx.to_pure_dict(param_shardings(a, mesh)) for a in abstract)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(weights, shardings)
        sampled = Sampler(graphdef, tokenizer, pairs, max_new_tokens=8)(sharded)
    # The same weights on one device, prompted as a user would (chat template, generation prompt).
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    expected = generate_text(nnx.merge(graphdef, *weights), tokenizer, prompts, max_new_tokens=8)
    assert [s["completion"] for s in sampled] == expected and all(expected)
    for sample, messages in zip(sampled, prompts):
        assert messages[-1]["content"] in sample["prompt"]


@pytest.mark.parametrize("report_to, message", [
    ("tensorbord", r"train\.report_to: unknown tracker 'tensorbord'; choose from tensorboard, wandb or none"),
    ("none,wandb", r"train\.report_to: 'none,wandb': 'none' cannot be combined"),
])
def test_a_bad_report_to_fails_before_anything_is_written(data, tmp_path, report_to, message):
    with pytest.raises(ValueError, match=message):
        run_lib.run(config_of("sft", data, {"train.report_to": report_to}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_samples_need_eval_data(data, tmp_path):
    with pytest.raises(ValueError, match=r"train\.sample_every: needs data\.eval"):
        run_lib.run(config_of("sft", {**data, "data.eval": ""}, {"train.sample_every": 2}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_is_imported_only_when_asked_for(tmp_path):
    code = f"""
import sys
from jaxft import config as config_lib, run
from jaxft.io.metrics import MetricsWriter
config = config_lib.load({str(REPO / "configs/sft.py")!r} + ":tiny")
config_lib.validate(config)  # report_to=tensorboard, the default
writer = MetricsWriter({str(tmp_path)!r}, report_to=config.train.report_to, config=config.to_dict())
writer.write(1, {{"loss": 1.0}})
writer.write_samples(1, [{{"prompt": "a", "completion": "b"}}])
writer.close(completed=True)
print("wandb" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
