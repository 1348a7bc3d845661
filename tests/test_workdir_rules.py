"""What a run may write into and what a resume may change: the workdir rule (a run trains into a
missing or empty folder or a jaxft run, never a model, export, adapter, dataset or anything
else), numeric keys whose 0 / negative values mean something or are refused (none deletes
work), and resume refusals that name the source file or the config key that changed.

All cheap: folders built in tmp_path, configs validated without a run, data iterators over a
few records; the one `jaxft.run` here is refused before it compiles anything.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from jaxft import config as config_lib
from jaxft.io import checkpoint, folders

SFT_TINY, DPO_TINY = "configs/sft.py:tiny", "configs/dpo.py:tiny"


# --- the workdir rule ---------------------------------------------------------------------------


def _json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _hf_model(folder):
    _json(folder / "config.json", {"model_type": "llama", "hidden_size": 8})
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


RUN_CONFIG = config_lib.base_config().to_dict()


def _make(kind, root):
    """Builds a folder of `kind` under `root`; returns the path to give as --workdir."""
    path = root / kind
    if kind == "missing":
        return path
    if kind in ("file", "dataset file"):
        path = root / ("notes" if kind == "file" else "train.jsonl")
        path.write_text('{"prompt": "a", "completion": "b"}\n')
        return path
    path.mkdir()
    if kind == "hidden entries only":
        (path / ".DS_Store").write_bytes(b"x")
    elif kind == "run":
        _json(path / "config.json", RUN_CONFIG)
        (path / "checkpoints" / "4").mkdir(parents=True)
    elif kind == "run killed while tokenising":  # config.json written, no step saved yet
        _json(path / "config.json", RUN_CONFIG)
        (path / "checkpoints").mkdir()
        _json(path / "run.lock", {"host": "h", "pid": 1})
    elif kind == "run killed before its config":
        _json(path / "run.lock", {"host": "h", "pid": 1})
    elif kind == "sweep run not started":
        _json(path / "sweep_run.json", {"status": "running"})
    elif kind == "hf model":
        _hf_model(path)
    elif kind == "hf model overwritten by an old jaxft":  # the damage the rule now prevents
        _hf_model(path)
        _json(path / "config.json", RUN_CONFIG)
    elif kind == "export":
        _hf_model(path)
        _json(path / folders.EXPORT_MARKER, {"layout": "hf"})
    elif kind == "peft adapter":
        _json(path / "adapter_config.json", {"r": 4})
    elif kind == "tokenizer":
        _json(path / "tokenizer.json", {})
    elif kind == "dataset":
        (path / "part-0.jsonl.gz").write_bytes(b"\x1f\x8b")
    elif kind == "saved dataset":
        _json(path / "dataset_info.json", {})
    elif kind == "runs folder":
        _json(path / "a" / "config.json", RUN_CONFIG)
    elif kind == "other":
        (path / "notes.txt").write_text("x")
        (path / "src").mkdir()
    elif kind == "inside a model":
        return _hf_model(path) / "run"
    elif kind == "inside a run":
        _json(path / "config.json", RUN_CONFIG)
        return path / "checkpoints" / "x"
    elif kind == "a run's export":
        _json(path / "config.json", RUN_CONFIG)
        _json(_hf_model(path / "hf") / folders.EXPORT_MARKER, {"layout": "hf"})
        return path / "hf"
    return path


ACCEPTED = ["missing", "empty", "hidden entries only", "run", "run killed while tokenising",
            "run killed before its config", "sweep run not started"]
REFUSED = {
    "file": "is a file, not a folder",
    "dataset file": "is a file, not a folder (a dataset? to train on it, set --config.data.train=",
    "hf model": "is a Hugging Face model folder (config.json, model.safetensors): a run would write its "
                "config.json over the model's (to train from it, set --config.model.path=",
    "hf model overwritten by an old jaxft": "is a Hugging Face model folder (model.safetensors)",
    "export": "is a jaxft export (jaxft_export.json, layout 'hf')",
    "peft adapter": "is a PEFT adapter folder (adapter_config.json)",
    "tokenizer": "is a Hugging Face model folder (tokenizer.json)",
    "dataset": "is a dataset folder (part-0.jsonl.gz; to train on it, set --config.data.train=",
    "saved dataset": "is a dataset folder (dataset_info.json",
    "runs folder": "holds runs (a) but is not one: give each run its own folder",
    "other": "is a folder with other files in it (notes.txt, src/) and no jaxft run",
    "inside a model": "which is a Hugging Face model folder",
    "inside a run": "is inside the run",
    "a run's export": "is a jaxft export (jaxft_export.json, layout 'hf'): a run would write its config.json over",
}


@pytest.mark.parametrize("kind", ACCEPTED)
def test_a_run_may_write_into_a_new_or_empty_folder_or_a_run(kind, tmp_path):
    folders.check_workdir(_make(kind, tmp_path))


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_any_other_folder_is_refused_saying_what_it_is(kind, tmp_path):
    path = _make(kind, tmp_path)
    with pytest.raises(ValueError) as err:
        folders.check_workdir(path)
    message = str(err.value)
    assert message.startswith(f"workdir {path} ") and REFUSED[kind] in message
    assert message.endswith("A run needs a new or empty folder, or a jaxft run's workdir to resume: "
                            "give another --workdir")


def test_a_workdir_may_not_be_inside_or_hold_what_the_config_reads(tmp_path):
    model = _hf_model(tmp_path / "base")
    data = tmp_path / "data"
    (data / "train.jsonl").parent.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    config = config_lib.load(SFT_TINY, {"model.path": str(model), "model.preset": "",
                                        "data.train": f"{data}/*.jsonl=0.5,{data}/train.jsonl=0.5"})
    problem = folders.workdir_problem(model, config)
    assert problem == "is config key model.path: the run would write into what it reads"
    assert folders.workdir_problem(data / "run1", config) == (
        f"is inside {data.resolve()}, the path of config key data.train: the run would write into what it reads")
    # A run's workdir given again for a second stage that starts from its export.
    run = _make("run", tmp_path)
    _hf_model(run / "hf")
    stage2 = config_lib.load(SFT_TINY, {"model.path": str(run / "hf"), "model.preset": ""})
    assert folders.workdir_problem(run, stage2) == (
        f"holds config key model.path ({(run / 'hf').resolve()}) where the run writes its own hf: "
        "the run would replace what it reads")
    assert folders.workdir_problem(tmp_path / "stage2", stage2) is None  # a new folder is fine
    assert folders.SWEEP_RECORD == __import__("jaxft.sweep.runner", fromlist=["RECORD"]).RECORD


@pytest.mark.parametrize("case", ["export", "model.path itself"])
def test_a_run_refuses_a_model_folder_before_writing_a_byte(case, tmp_path):
    from jaxft import run as run_lib

    folder = _make("export" if case == "export" else "hf model", tmp_path)
    overrides = {"model.path": str(folder), "model.preset": ""} if case != "export" else {}
    before = {p: p.read_bytes() for p in folder.rglob("*")}
    with pytest.raises(ValueError, match=f"workdir {folder} " + (
            "is a jaxft export" if case == "export" else "is config key model.path")):
        run_lib.run(config_lib.load(SFT_TINY, overrides), folder)
    assert {p: p.read_bytes() for p in folder.rglob("*")} == before  # nothing added, nothing changed


def test_a_sweep_refuses_a_run_folder_that_is_a_model_before_writing_anything(tmp_path):
    from jaxft import sweep

    sweep_dir = tmp_path / "sweep"
    model = _hf_model(sweep_dir / "lr=0.001")  # a run's folder already holds a model
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    runs = sweep.grid({"optim.lr": [0.001]}, kind="sft", config=SFT_TINY)
    with pytest.raises(ValueError, match=f"workdir {model} is a Hugging Face model folder"):
        sweep.run_sweep(runs, sweep_dir, log=lambda _: None)
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before  # no sweep.json, no record


def test_the_quickstart_refuses_a_non_empty_folder_that_is_not_a_quickstart(tmp_path):
    from jaxft.quickstart.pipeline import run_quickstart

    _hf_model(tmp_path / "mine")
    with pytest.raises(ValueError, match="not a quickstart's .config.json, model.safetensors."):
        run_quickstart(tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.json", "model.safetensors"]


def test_a_damaged_model_config_names_the_file(tmp_path):
    from jaxft.models.config import read_hf_config

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        read_hf_config(tmp_path)


# --- numeric keys: 0 and negative values ------------------------------------------------------------

# Values that mean something (documented by the key in base_config) and pass validation.
MEANINGFUL = [("train.max_to_keep", 0), ("train.save_every", 0), ("train.eval_every", 0),
              ("train.eval_every", -1), ("train.loss_chunk_size", 0), ("train.loss_chunk_size", -1),
              ("data.eval_batch_size", 0), ("data.num_proc", 0), ("optim.clip_norm", 0.0), ("model.linear_chunk_size", 0),
              ("train.prefetch", 0), ("train.sample_every", 0), ("optim.warmup_steps", 0),
              ("lora.rank", 0), ("mesh.data", -1), ("train.seed", -5), ("data.max_record_bytes", 0),
              ("train.router_aux_loss_coef", 0.0), ("train.router_z_loss_coef", 0.0),
              ("train.router_bias_update_rate", 0.0), ("train.eval_benchmark_limit", 0),
              ("train.eval_benchmark_max_new_tokens", 0)]
# Nonsense, refused naming the key and the allowed range.
REFUSED_VALUES = [
    ("train.max_to_keep", -1, ">= 0 (0 = keep every checkpoint)"), ("train.steps", -1, ">= 0"),
    ("train.epochs", -1.0, ">= 0"), ("train.epochs", math.inf, "finite"), ("train.batch_size", 0, ">= 1"),
    ("train.save_every", -1, ">= 0 (0 = only at the end)"), ("train.log_every", 0, ">= 1"),
    ("train.eval_every", -2, "or -1 for every epoch"), ("train.loss_chunk_size", -2, "or -1 (auto)"),
    ("train.max_bad_steps", 0, ">= 1"), ("train.prefetch", -1, ">= 0"),
    ("train.preemption_check_every", 0, ">= 1"), ("train.sample_every", -1, ">= 0"),
    ("train.sample_prompts", 0, ">= 1"), ("train.sample_max_new_tokens", 0, ">= 1"),
    ("data.max_length", 1, ">= 2"), ("data.max_segments_per_row", 0, ">= 1"),
    ("data.eval_batch_size", -1, ">= 0"), ("data.max_record_bytes", -1, ">= 0 (0 = no limit)"), ("data.num_proc", -1, ">= 0"), ("data.shuffle_buffer", 0, ">= 1"),
    ("model.linear_chunk_size", -1, ">= 0 (0 = the default)"),
    ("optim.lr", 0.0, "> 0"), ("optim.lr", math.nan, "finite"), ("optim.warmup_steps", -1, ">= 0"),
    ("optim.warmup_ratio", 1.0, "[0, 1)"), ("optim.min_lr_ratio", 1.5, "[0, 1]"),
    ("optim.weight_decay", -0.1, ">= 0"), ("train.router_aux_loss_coef", -0.1, ">= 0 (0 = off)"),
    ("train.router_z_loss_coef", -0.1, ">= 0 (0 = off)"), ("train.router_bias_update_rate", -0.1, ">= 0 (0 = off)"),
    ("optim.clip_norm", -1.0, ">= 0 (0 = no clipping)"),
    ("optim.accumulate", 0, ">= 1"), ("optim.b1", 1.0, "[0, 1)"), ("optim.b2", -0.1, "[0, 1)"),
    ("optim.eps", 0.0, "> 0"), ("mesh.fsdp", 0, "or -1 for the devices left"), ("mesh.tensor", 0, ">= 1"), ("mesh.data", -2, ">= 1"),
    ("mesh.expert", 0, ">= 1"),
    ("mesh.sequence", -1, "only one mesh axis may be -1"), ("lora.rank", -1, ">= 0"),
    ("lora.alpha", 0.0, "> 0"), ("lora.dropout", 1.0, "[0, 1)"),
]
# Numeric keys the task checks (dpo.*) or that take any value.
# iterate.*: `jaxft iterate` checks them (jaxft.iterate.rounds.check_iterate_config; tests/test_iterate.py).
# dpo.online_*: online DPO's task (jaxft.tasks.online_dpo.online_problem; tests/test_online_dpo.py): 0 refused.
CHECKED_ELSEWHERE = {"dpo.beta", "dpo.label_smoothing", "train.seed", "iterate.rounds", "iterate.samples",
                     "iterate.prompts_per_round", "iterate.temperature", "iterate.top_p", "iterate.max_new_tokens",
                     "iterate.min_margin", "iterate.pairs_per_prompt", "dpo.online_max_new_tokens",
                     "dpo.online_temperature"}


def _numeric_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numeric_keys(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key


def test_every_numeric_key_has_its_zero_and_negative_values_decided():
    decided = {k for k, *_ in MEANINGFUL + REFUSED_VALUES} | CHECKED_ELSEWHERE
    assert set(_numeric_keys(config_lib.base_config().to_dict())) <= decided


@pytest.mark.parametrize("key,value", MEANINGFUL, ids=[f"{k}={v}" for k, v in MEANINGFUL])
def test_zero_or_minus_one_means_what_the_key_says(key, value):
    config_lib.validate(config_lib.load(SFT_TINY, {key: value}))


@pytest.mark.parametrize("key,value,allowed", REFUSED_VALUES, ids=[f"{k}={v}" for k, v, _ in REFUSED_VALUES])
def test_nonsense_values_are_refused_naming_the_key_and_range(key, value, allowed):
    overrides = {key: value, **({"lora.rank": 4} if key.startswith("lora.") and key != "lora.rank" else {})}
    if key == "mesh.sequence":
        overrides["mesh.data"] = -1
    with pytest.raises(ValueError, match=f"config key {key.replace('.', '[.]') if key != 'mesh.sequence' else 'mesh'}"
                       ) as err:
        config_lib.validate(config_lib.load(SFT_TINY, overrides))
    assert allowed in str(err.value) and "got" in str(err.value)


def test_max_to_keep_0_keeps_every_checkpoint(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=0, async_save=False)
    state = {"w": np.zeros(2, np.float32)}
    for step in (1, 2, 3, 4):
        ckpt.save(step, state, {"data": {}})
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path, max_to_keep=0).all_steps() == [1, 2, 3, 4]  # Orbax's 0: none


def test_max_segments_per_row_is_checked_for_the_task_being_run():
    from jaxft.data.pipeline import check_max_segments
    from jaxft.tasks.dpo import DPO

    check_max_segments("sft", 1)  # one packed SFT example a row is allowed
    with pytest.raises(ValueError, match=r"must be >= 1 with data.packing=True \(a packed SFT example is "
                                         r"one segment\), got 0") as err:
        check_max_segments("sft", 0)
    assert "DPO" not in str(err.value)
    dpo = config_lib.load(DPO_TINY, {"data.packing": True, "data.max_segments_per_row": 1})
    config_lib.validate(dpo)  # >= 1 for every task; the DPO task asks for 2
    with pytest.raises(ValueError, match=r"config key data.max_segments_per_row: must be >= 2 .*a packed DPO "
                                         r"pair is two segments"):
        DPO.validate(dpo)


# --- resume: what may change, and refusals that name what did ------------------------------------


def _all_keys(tree, prefix=""):
    for key, value in tree.items():
        yield from _all_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]


def test_every_key_is_classed_once_for_resumption():
    groups = [checkpoint.RESUME_KEYS, checkpoint.SCHEDULE_KEYS, checkpoint.RESUME_FREE_KEYS,
              checkpoint.ITERATOR_KEYS, checkpoint.DATA_KEYS]
    classed = [k for group in groups for k in group]
    assert sorted(classed) == sorted(set(_all_keys(config_lib.base_config().to_dict())))
    assert "data.skip_invalid" in checkpoint.RESUME_FREE_KEYS and "train.log_every" in checkpoint.RESUME_FREE_KEYS


def test_free_keys_may_change_on_resume_and_others_are_named_with_old_and_new(tmp_path, caplog):
    saved = config_lib.load(SFT_TINY).to_dict()
    free = config_lib.load(SFT_TINY, {"data.skip_invalid": True, "train.log_every": 1, "train.eval_every": 7,
                                      "train.report_to": "none", "train.max_to_keep": 0}).to_dict()
    with caplog.at_level("INFO", logger="jaxft"):
        checkpoint.check_resumable(saved, free, tmp_path)
    assert "data.skip_invalid: checkpoint False -> now True (a key that may change on resume)" in caplog.text
    changed = config_lib.load(SFT_TINY, {"data.max_length": 64, "train.seed": 1}).to_dict()
    with pytest.raises(ValueError, match=r"data.max_length: checkpoint 128 -> now 64; train.seed: checkpoint 0 -> now 1"):
        checkpoint.check_resumable(saved, changed, tmp_path)
    assert checkpoint.data_change_hint(saved, free) == (
        " Changed config keys that decide the examples: data.skip_invalid: checkpoint False -> now True.")


WORDS = "the cat sat on a mat and then it ran".split()


def _records(path, n, bad_line=None, drop=None):
    lines = ['{"prompt": "broken\n' if i + 1 == bad_line else
             json.dumps({"prompt": f"q{i} " + " ".join(WORDS[: 1 + i % 9]), "completion": " ".join(WORDS[i % 5:])})
             + "\n" for i in range(n) if i != drop]
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from jaxft.data.from_config import load_bundled_tokenizer

    return load_bundled_tokenizer()


def test_a_changed_source_is_named_with_its_example_counts_not_hashes(tmp_path, tokenizer):
    from jaxft.data.pipeline import make_train_iterator

    a, b = _records(tmp_path / "a.jsonl", 20), _records(tmp_path / "b.jsonl", 12)
    make = lambda: make_train_iterator(f"{a}=0.5,{b}=0.5", tokenizer, kind="sft", global_batch_size=4,  # noqa: E731
                                       max_length=64, packing=False, seed=0)
    state = json.loads(json.dumps(make().get_state()))
    _records(tmp_path / "b.jsonl", 12, drop=3)
    with pytest.raises(ValueError) as err:
        make().set_state(state)
    assert f"(source {b!r}: 12 -> 11 examples)" in str(err.value) and repr(a) not in str(err.value)


def test_a_changed_stream_source_names_the_file_and_its_sizes(tmp_path, tokenizer):
    from jaxft.data.stream import make_stream_iterator

    source = _records(tmp_path / "train.jsonl", 20)
    make = lambda: make_stream_iterator(source, tokenizer, kind="sft", global_batch_size=4, max_length=64,  # noqa: E731
                                        packing=True, seed=0, shuffle_buffer=8)
    it = make()
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    size = (tmp_path / "train.jsonl").stat().st_size
    _records(tmp_path / "train.jsonl", 21)
    with pytest.raises(ValueError) as err:
        make().set_state(state)
    resolved = (tmp_path / "train.jsonl").resolve()
    new_size = (tmp_path / "train.jsonl").stat().st_size
    assert f"source {source!r}: file {resolved} changed ({size} -> {new_size} bytes)" in str(err.value)


def test_a_stream_stopped_at_a_bad_record_resumes_with_skip_invalid_exactly(tmp_path, tokenizer):
    """The remedy docs/runs.md gives for a bad record met mid-run: rerun with data.skip_invalid=True. The
    resume continues as a run that had it on from the start, batch for batch."""
    from jaxft.data.stream import make_stream_iterator

    source = _records(tmp_path / "train.jsonl", 40, bad_line=30)

    def make(skip):
        return make_stream_iterator(source, tokenizer, kind="sft", global_batch_size=4, max_length=64,
                                    packing=True, seed=3, shuffle_buffer=8, load_kwargs={"skip_invalid": skip})

    stopped, states = make(False), []
    with pytest.raises(ValueError, match="train.jsonl line 30: invalid JSON"):
        while True:
            next(stopped)
            states.append(json.loads(json.dumps(stopped.get_state())))
    skipping = make(True)
    reference = [next(skipping) for _ in range(len(states) + 8)]
    resumed = make(True)
    resumed.set_state(states[-1])  # not "the training data changed"
    for want in reference[len(states):]:
        got = next(resumed)
        for field in dataclasses.fields(want):
            np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name))
