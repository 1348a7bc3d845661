"""Streaming sources (data.streaming): exact resume from the stream position, seeded window
shuffles, packing on the fly with the in-memory packer's accounting, weighted mixtures of
streams, host slices, clear errors, and a run stopped by SIGTERM that resumes exactly."""

import collections
import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.pipeline import make_train_iterator
from jaxft.data.stream import make_stream_iterator

WORDS = "the cat sat on a mat and then it ran to one big red house far away".split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_bundled_tokenizer()


def _write(path, n, *, kind="sft", seed=0, bad_line=None):
    """n records of varied length (prompt ~1-12 words, completion ~1-40), one a line."""
    rng = np.random.default_rng(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            if i + 1 == bad_line:
                f.write('{"prompt": "broken\n')
                continue
            record = {"prompt": f"q{i} " + words(1, 12)}
            if kind == "sft":
                record["completion"] = words(1, 40)
            else:
                record["chosen"], record["rejected"] = words(1, 20), words(1, 20)
            f.write(json.dumps(record) + "\n")
    return str(path)


def _stream(source, tokenizer, **kw):
    kw = {"kind": "sft", "global_batch_size": 4, "max_length": 64, "packing": True, "seed": 3,
          "shuffle_buffer": 16, **kw}
    return make_stream_iterator(source, tokenizer, **kw)


def _equal(a, b):
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name),
                                      err_msg=field.name)


def _keys(batch):
    index = batch.pair_index[batch.pair_mask == 1] if hasattr(batch, "pair_index") else batch.example_index
    return [int(k) for k in np.ravel(index) if k >= 0]


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,packing", [("sft", True), ("sft", False), ("dpo", True), ("dpo", False)])
def test_resume_from_the_saved_stream_position_is_exact(tmp_path, tokenizer, kind, packing):
    """Stopped after any batch (mid-window, at a window's end, across an epoch) and resumed
    from its JSON state in a fresh iterator == the uninterrupted stream, batch for batch."""
    source = _write(tmp_path / "train.jsonl", 37, kind=kind)
    n = 24  # 37 records in windows of 16: 3 windows an epoch, ~3 epochs
    reference = _stream(source, tokenizer, kind=kind, packing=packing)
    batches, states = [], []
    for _ in range(n):
        batches.append(next(reference))
        states.append(json.loads(json.dumps(reference.get_state())))
    assert reference.epoch >= 1
    stream_positions = {json.dumps(s["sources"]) for s in states}
    assert len(stream_positions) > 3  # the state moves with the stream, not just a batch count
    for stop in (0, 3, 7, 11, 16):
        resumed = _stream(source, tokenizer, kind=kind, packing=packing)
        resumed.set_state(states[stop])
        for want in batches[stop + 1:]:
            _equal(next(resumed), want)
        assert resumed.real_tokens == reference.real_tokens
        assert resumed.get_state() == states[-1]


def test_resume_refuses_changed_data_settings_or_a_non_streaming_state(tmp_path, tokenizer):
    from jaxft.data.pipeline import BatchIterator

    source = _write(tmp_path / "train.jsonl", 20)
    it = _stream(source, tokenizer)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match="shuffle_buffer: 16 -> 8"):
        _stream(source, tokenizer, shuffle_buffer=8).set_state(state)
    _write(tmp_path / "train.jsonl", 21)
    with pytest.raises(ValueError, match="the training data changed"):
        _stream(source, tokenizer).set_state(state)
    in_memory = make_train_iterator(source, tokenizer, kind="sft", global_batch_size=4,
                                    max_length=64, packing=True, seed=3)
    assert isinstance(in_memory, BatchIterator)
    with pytest.raises(ValueError, match="written with data.streaming=True"):
        in_memory.set_state(state)
    with pytest.raises(ValueError, match="written with data.streaming=False"):
        _stream(source, tokenizer).set_state(in_memory.get_state())


# --- the seeded window shuffle ----------------------------------------------------------------


def test_window_shuffle_is_seeded_bounded_and_uses_each_record_once_per_epoch(tmp_path, tokenizer):
    source = _write(tmp_path / "train.jsonl", 48)

    def epochs(seed, count=2):
        it = _stream(source, tokenizer, seed=seed, packing=False)
        out = [[] for _ in range(count)]
        while it.epoch < count:
            epoch = it.epoch
            out[epoch] += _keys(next(it))
        return out

    first, second = epochs(3), epochs(3)
    assert first == second  # the same seed, the same order
    for keys in first:
        assert sorted(keys) == list(range(48))  # each record exactly once per epoch
        # Windows of 16 records are shuffled among themselves: never further than a window.
        assert [sorted(keys[i:i + 16]) for i in (0, 16, 32)] == [
            list(range(i, i + 16)) for i in (0, 16, 32)]
    assert first[0] != first[1]  # each epoch reshuffles
    assert epochs(4)[0] != first[0]  # another seed, another order
    assert first[0] != sorted(first[0])


# --- packing on the fly -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_packing_on_the_fly_accounts_tokens_as_the_in_memory_packer(tmp_path, tokenizer, kind):
    """Same examples, token for token, as load_examples; with a window holding the whole
    source the packer sees what the in-memory one sees: the same rows, batches, real tokens and
    padding per epoch. A small window packs only slightly worse."""
    from jaxft.data.tokenize import load_examples

    source = _write(tmp_path / "train.jsonl", 60, kind=kind)
    common = dict(kind=kind, global_batch_size=4, max_length=64, packing=True, seed=1)
    memory = make_train_iterator(source, tokenizer, **common)
    per_epoch = memory.batches_per_epoch()
    for _ in range(per_epoch):
        next(memory)
    assert memory.epoch == 1

    whole = make_stream_iterator(source, tokenizer, shuffle_buffer=1000, **common)
    seen = {}
    for _ in range(per_epoch):
        batch = next(whole)
        seen.update({k: None for k in _keys(batch)})
    assert whole.epoch == 1
    assert (whole.real_tokens, whole.padding_fraction) == (memory.real_tokens, memory.padding_fraction)
    loaded = load_examples(source, tokenizer, kind=kind, max_length=32 if kind == "dpo" else 64)
    assert sorted(seen) == [e.index for e in loaded.examples]
    assert whole.real_tokens == sum(len(e) for e in loaded.examples)

    small = make_stream_iterator(source, tokenizer, shuffle_buffer=16, **common)
    while small.epoch < 1:
        next(small)
    assert small.real_tokens == memory.real_tokens  # every example once
    assert small.padding_fraction < memory.padding_fraction + 0.15


def test_stream_examples_equal_load_examples(tmp_path, tokenizer):
    from jaxft.data.tokenize import load_examples

    source = _write(tmp_path / "train.jsonl", 30)
    stream = _stream(source, tokenizer).streams[0]
    examples, ended = stream.take(100, stop_at_epoch_end=True)
    assert ended and len(examples) == 30
    by_index = {e.index: e for e in examples}
    for want in load_examples(source, tokenizer, kind="sft", max_length=64).examples:
        got = by_index[want.index]
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.loss_mask, want.loss_mask)


# --- mixtures and hosts --------------------------------------------------------------------------


def test_weighted_mixture_of_two_streams_follows_the_weights(tmp_path, tokenizer):
    a = _write(tmp_path / "a.jsonl", 20, seed=1)
    b = _write(tmp_path / "b.jsonl", 30, seed=2)
    it = _stream(f"{a}=0.75,{b}=0.25", tokenizer, packing=False, global_batch_size=8)
    draws = collections.Counter()
    per_source = {0: [], 1: []}
    for _ in range(150):  # 1,200 draws
        for key in _keys(next(it)):
            draws[key % 2] += 1
            per_source[key % 2].append(key // 2)
    total = draws[0] + draws[1]
    assert total == 1200  # a mixture is never padded
    assert abs(draws[0] / total - 0.75) < 0.04, draws
    # Each source repeats, every record once per its own epoch: after whole chunks (150
    # batches = 75 chunks of 16 draws), each record was drawn k or k + 1 times.
    for d, size in ((0, 20), (1, 30)):
        uses = collections.Counter(per_source[d])
        assert sorted(uses) == list(range(size))
        assert max(uses.values()) - min(uses.values()) <= 1, uses
    assert it.dataset_epochs[a] == draws[0] // 20 and it.dataset_epochs[b] >= 1
    state = json.loads(json.dumps(it.get_state()))
    resumed = _stream(f"{a}=0.75,{b}=0.25", tokenizer, packing=False, global_batch_size=8)
    resumed.set_state(state)
    for _ in range(5):
        _equal(next(resumed), next(it))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_hosts_take_their_slices_of_the_one_host_batch(tmp_path, tokenizer, kind):
    source = _write(tmp_path / "train.jsonl", 25, kind=kind)
    one = _stream(source, tokenizer, kind=kind, global_batch_size=8)
    hosts = [_stream(source, tokenizer, kind=kind, global_batch_size=8, process_index=h,
                     process_count=2) for h in range(2)]
    for _ in range(6):
        whole, parts = next(one), [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
        if kind == "dpo":  # the pair arrays describe the global batch on every host
            np.testing.assert_array_equal(parts[0].pair_index, parts[1].pair_index)
            assert sorted(_keys(parts[0])) == sorted(_keys(whole))


def test_a_hub_name_is_streamed_not_downloaded(tmp_path, tokenizer, monkeypatch):
    """The hub branch (offline here: a stand-in `datasets`) asks for streaming=True and
    feeds the same windows; its records are located as name[split] index i."""
    import sys
    import types

    records = [json.loads(line) for line in open(_write(tmp_path / "hub.jsonl", 12))]
    calls = []

    def load_dataset(name, *, split, streaming=False):
        calls.append((name, split, streaming))
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    it = _stream("someorg/somedata", tokenizer, packing=False)
    keys = []
    while it.epoch < 1:
        keys += _keys(next(it))
    assert sorted(keys) == list(range(12))
    assert calls and all(call == ("someorg/somedata", "train", True) for call in calls)
    records[3] = {"prompt": 5}
    with pytest.raises(ValueError, match=r"someorg/somedata\[train\] index 3"):
        for _ in range(10):
            next(it)


# --- errors ---------------------------------------------------------------------------------------


def test_a_bad_record_names_its_line_when_reached_or_is_skipped(tmp_path, tokenizer):
    source = _write(tmp_path / "train.jsonl", 40, bad_line=30)
    it = _stream(source, tokenizer)  # the first window is fine: the error comes with the record
    with pytest.raises(ValueError, match=r"train.jsonl line 30: invalid JSON"):
        for _ in range(20):
            next(it)
    skipping = _stream(source, tokenizer, load_kwargs={"skip_invalid": True})
    while skipping.epoch < 1:
        next(skipping)
    assert skipping.reports[source].num_skipped == 1
    assert skipping.reports[source].num_examples == 39
    with pytest.raises(ValueError, match=r"line 1: invalid JSON"):
        _stream(_write(tmp_path / "first.jsonl", 5, bad_line=1), tokenizer)  # at start-up
    with pytest.raises(ValueError, match="missing.jsonl: file not found"):
        _stream(str(tmp_path / "missing.jsonl"), tokenizer)


def test_run_configs_a_stream_cannot_serve_fail_naming_the_key(tmp_path, tokenizer):
    from jaxft import config as config_lib
    from jaxft.data.from_config import train_data

    source = _write(tmp_path / "train.jsonl", 10)
    base = {"data.train": source, "data.streaming": True}
    for overrides, key in (({"train.epochs": 1.0}, "train.epochs"),
                           ({"train.eval_every": -1}, "train.eval_every"),
                           ({"data.shuffle_buffer": 0}, "data.shuffle_buffer")):
        config = config_lib.load("configs/sft.py:tiny", {**base, **overrides})
        with pytest.raises(ValueError, match=f"config key {key}"):
            train_data(config, tokenizer, kind="sft")
    dpo = config_lib.load("configs/dpo.py:tiny", {**base, "dpo.precompute_reference": True,
                                                  "data.train": _write(tmp_path / "p.jsonl", 5, kind="dpo")})
    with pytest.raises(ValueError, match="config key dpo.precompute_reference"):
        train_data(dpo, tokenizer, kind="dpo")


# --- a run -------------------------------------------------------------------------------------------


def test_a_streaming_run_stopped_by_sigterm_resumes_the_exact_loss_curve(tmp_path, monkeypatch):
    from jaxft import config as config_lib, loop, run as run_lib
    from jaxft.io import checkpoint
    from jaxft.io.metrics import MetricsWriter, read_metrics
    from tests.quickstart_subset import quickstart_head

    data = str(quickstart_head(tmp_path, "sft_train.jsonl", 40))  # 5 batches an epoch
    steps, stop_at = 7, 3
    overrides = {"data.train": data, "data.streaming": True, "data.shuffle_buffer": 16,
                 "data.max_length": 64, "data.packing": False, "train.steps": steps,
                 "train.batch_size": 8, "train.log_every": 1, "train.save_every": 100,
                 "train.progress": False, "optim.warmup_steps": 2, "mesh.data": -1}
    config = config_lib.load("configs/sft.py:tiny", overrides)
    reference = run_lib.run(config, tmp_path / "reference", export=False)

    write = MetricsWriter.write

    def write_then_sigterm(self, step, metrics):
        write(self, step, metrics)
        if step == stop_at and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_sigterm)
    with pytest.raises(loop.Preempted):
        run_lib.run(config, tmp_path / "resumed", export=False)
    monkeypatch.undo()
    ckpt = checkpoint.Checkpointer(tmp_path / "resumed")
    try:
        assert ckpt.latest_step() == stop_at
        saved = ckpt.restore_meta(stop_at)["data"]  # the data state holds the stream position
    finally:
        ckpt.close()
    assert saved["streaming"] and saved["sources"][0]["records"] == 16  # in the second window
    resumed = run_lib.run(config, tmp_path / "resumed", export=False)
    assert resumed.step == steps
    ours, ref = read_metrics(tmp_path / "resumed"), read_metrics(reference.workdir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, steps + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, ref)) <= 1e-6
    assert [a["num_tokens"] for a in ours] == [b["num_tokens"] for b in ref]
    assert ref[-1]["epoch"] == 1.0  # the run crossed the end of the stream and read it again
