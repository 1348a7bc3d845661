"""The batch iterator: deterministic, resumable, sharded across hosts, fixed shapes, mixtures,
and the one-pass eval batches."""

import collections
import dataclasses
import json
import sys
import types

import numpy as np
import pytest

from jaxft.data.batch import DPOBatch, PreferenceExample, SFTExample
from jaxft.data.mixture import DrawStream, parse_mixture
from jaxft.data.packing import bucket_lengths
from jaxft.data.pipeline import (
    BatchIterator, EvalBatches, make_eval_batches, make_train_iterator)

MAX_LEN = 64


def _sft(n, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        out.append(SFTExample((i * 100 + np.arange(k)).astype(np.int32),
                              (np.arange(k) > 1).astype(np.int32), index=i))
    return out


def _dpo(n, seed=0, lo=2, hi=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c, r = (int(x) for x in rng.integers(lo, hi + 1, 2))
        out.append(PreferenceExample((i * 100 + np.arange(c)).astype(np.int32),
                                     np.ones(c, np.int32),
                                     (i * 100 + 50 + np.arange(r)).astype(np.int32),
                                     np.ones(r, np.int32), index=i))
    return out


def _make(examples, kind="sft", **kw):
    kw = {"global_batch_size": 8, "max_length": MAX_LEN, "pad_id": 0, "seed": 3, **kw}
    datasets = examples if isinstance(examples[0], list) else [examples]
    return BatchIterator(datasets, kind=kind, **kw)


def _keys(batch, host=0):
    """Source keys of the examples / pairs in host `host`'s rows of a batch, in row order (a
    DPO batch's pair arrays cover every host, with global row numbers)."""
    if isinstance(batch, DPOBatch):
        rows = batch.tokens.shape[0]
        mine = (batch.pair_mask == 1) & (batch.chosen_row // rows == host)
        return batch.pair_index[mine].tolist()
    return batch.example_index[batch.example_index >= 0].tolist()


def _equal(a, b):
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y, err_msg=field.name)


CASES = [("sft", False), ("sft", True), ("dpo", False), ("dpo", True)]


def _data(kind, n=45, hi=None):
    return _sft(n, hi=hi or 40) if kind == "sft" else _dpo(n, hi=hi or 30)


@pytest.mark.parametrize("kind,packing", CASES)
def test_two_hosts_use_every_example_once_per_epoch(kind, packing):
    # Lengths up to 100 in rows of 256: unpacked batches use buckets 64 and 128.
    examples = _data(kind, hi=100)
    kw = {"packing": packing, "pack_chunk": 16, "window_batches": 2, "max_length": 256}
    hosts = [_make(examples, kind, process_index=h, process_count=2, **kw) for h in range(2)]
    per_epoch = hosts[0].batches_per_epoch()
    epochs = []
    for epoch in range(3):
        assert hosts[0].epoch == epoch
        used = []
        for _ in range(per_epoch):
            a, b = next(hosts[0]), next(hosts[1])
            assert not set(_keys(a, 0)) & set(_keys(b, 1))  # the host slices are disjoint
            assert a.tokens.shape == b.tokens.shape  # one global bucket
            used += _keys(a, 0) + _keys(b, 1)
            if kind == "dpo":
                for field in ("chosen_row", "chosen_segment", "rejected_row", "rejected_segment",
                              "pair_mask", "pair_index"):  # every host holds the global pairs
                    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
                _check_pair_lookup(a, examples, 0)
                _check_pair_lookup(b, examples, 1)
        assert sorted(used) == list(range(len(examples)))
        epochs.append(used)
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


def _check_pair_lookup(batch, examples, host):
    """The pair slots of this host's rows (global row numbers) hold the right tokens."""
    rows = batch.tokens.shape[0]
    for p in np.flatnonzero((batch.pair_mask == 1) & (batch.chosen_row // rows == host)):
        ex = examples[batch.pair_index[p]]
        for row, seg, ids in ((batch.chosen_row[p], batch.chosen_segment[p], ex.chosen_ids),
                              (batch.rejected_row[p], batch.rejected_segment[p],
                               ex.rejected_ids)):
            local = row - host * rows
            np.testing.assert_array_equal(batch.tokens[local][batch.segment_ids[local] == seg], ids)


@pytest.mark.parametrize("kind,packing", CASES)
def test_resume_gives_the_identical_continuation(kind, packing):
    # 45 examples, batches of 8 (packed: chunks of 16 examples): the 14 batches after the
    # restore point cross chunk and epoch boundaries.
    examples = _data(kind)
    kw = {"packing": packing, "pack_chunk": 16, "window_batches": 2}
    reference = _make(examples, kind, **kw)
    expected = [next(reference) for _ in range(20)]
    for k in (0, 3, 6):
        it = _make(examples, kind, **kw)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        restored = _make(examples, kind, **kw)
        restored.set_state(state)
        for want in expected[k:k + 14]:
            _equal(next(restored), want)
        straight = _make(examples, kind, **kw)
        for _ in range(k + 14):
            next(straight)
        assert restored.get_state() == straight.get_state()  # padding stats continue too


def test_resume_of_a_mixture():
    sources = [_sft(30, seed=1), _sft(50, seed=2), _sft(20, seed=3)]
    kw = {"weights": [0.312, 0.466, 0.222], "packing": True, "pack_chunk": 24}
    it = _make(sources, **kw)
    expected = [next(it) for _ in range(30)]
    it = _make(sources, **kw)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = _make(sources, **kw)
    restored.set_state(state)
    assert restored.dataset_epochs == it.dataset_epochs
    for want in expected[11:]:
        _equal(next(restored), want)


def test_seed_decides_the_order():
    examples = _sft(100)
    order = lambda seed: [_keys(next(it)) for it in [_make(examples, seed=seed)] for _ in range(5)]
    assert order(1) == order(1)
    assert order(1) != order(2)


@pytest.mark.parametrize("kind,packing", CASES)
def test_batch_shapes_are_fixed(kind, packing):
    it = _make(_data(kind, 200), kind, packing=packing, global_batch_size=8,
               max_length=128, max_segments_per_row=16)
    shapes = collections.defaultdict(set)
    for _ in range(60):
        batch = next(it)
        for field in dataclasses.fields(batch):
            shapes[field.name].add(getattr(batch, field.name).shape)
            assert getattr(batch, field.name).dtype == np.int32
    rows = 16 if kind == "dpo" and not packing else 8
    lengths = {s[1] for s in shapes["tokens"]}
    assert {s[0] for s in shapes["tokens"]} == {rows}
    assert lengths <= ({128} if packing else set(bucket_lengths(128)))
    for name, found in shapes.items():  # each bucket has one shape per field
        assert len(found) <= len(lengths), (name, found)
    if kind == "sft":
        assert shapes["example_index"] == {(8, 16 if packing else 1)}
    else:
        assert shapes["pair_mask"] == {(8 * 8 if packing else 8,)}
    assert it.max_segments_per_row == (16 if packing else 1)  # S of the per-segment arrays


def test_unpacked_batches_group_similar_lengths():
    examples = _sft(2000, lo=1, hi=512)

    def padding(window):
        it = _make(examples, max_length=512, global_batch_size=16, window_batches=window)
        for _ in range(100):
            next(it)
        return it.padding_fraction

    # Window 1 = plain random batches; sorting 32 batches' worth makes batches homogeneous.
    assert padding(32) < padding(1) - 0.15


def test_padding_fraction_counts_the_produced_tokens():
    it = _make(_sft(45), packing=True, pack_chunk=16)
    real = slots = 0
    for _ in range(10):
        batch = next(it)
        real += int((batch.segment_ids > 0).sum())
        slots += batch.tokens.size
    assert it.padding_fraction == pytest.approx(1 - real / slots)


def test_restore_onto_changed_data_or_settings_fails_clearly():
    examples = _sft(40)
    state = _make(examples).get_state()
    changed = list(examples)
    changed[7] = dataclasses.replace(changed[7], input_ids=changed[7].input_ids + 1)
    assert _make(changed).get_state()["fingerprint"] != state["fingerprint"]
    assert _make(examples, seed=9).get_state()["fingerprint"] != state["fingerprint"]
    with pytest.raises(ValueError, match="training data changed since the checkpoint .source 'source0': the same "
                       "40 examples, other tokens"):
        _make(changed).set_state(state)
    with pytest.raises(ValueError, match="source 'source0': 40 -> 39 examples"):
        _make(examples[:39]).set_state(state)
    with pytest.raises(ValueError, match="batch settings changed.*global_batch_size: 8 -> 16"):
        _make(examples, global_batch_size=16).set_state(state)
    with pytest.raises(ValueError, match="seed: 3 -> 4"):
        _make(examples, seed=4).set_state(state)
    # Another host count reads the same global stream: that restore is allowed.
    _make(examples, process_index=1, process_count=2).set_state(state)


def test_batch_must_split_evenly_across_hosts():
    with pytest.raises(ValueError, match="train.batch_size \\(6\\).*multiple.*4"):
        _make(_sft(10), global_batch_size=6, process_count=4)


def test_too_long_examples_are_an_error():
    with pytest.raises(ValueError, match="max_length"):
        _make(_sft(10, lo=60, hi=70))


def test_mixture_proportions_and_per_source_epochs():
    sources = [_sft(50, seed=1), _sft(80, seed=2), _sft(30, seed=3)]
    weights = [0.312, 0.466, 0.222]
    it = _make(sources, weights=weights, global_batch_size=32, window_batches=32)
    counts = np.zeros(3, np.int64)
    for _ in range(12 * 32):  # 12 whole windows: the state sits at a window boundary
        for key in _keys(next(it)):
            counts[np.searchsorted(it.index_offsets, key, side="right") - 1] += 1
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.015)
    assert it.get_state()["counts"] == counts.tolist()
    # Each source cycles at its own rate.
    epochs = it.dataset_epochs
    assert epochs == {"source0": counts[0] // 50, "source1": counts[1] // 80,
                      "source2": counts[2] // 30}
    assert it.epoch == max(epochs.values())


def test_each_source_uses_its_examples_once_per_its_epoch():
    stream = DrawStream([7, 5], [0.5, 0.5], seed=0)
    datasets, examples, after = stream.take(0, [0, 0], 200)
    assert after == [int((datasets == 0).sum()), int((datasets == 1).sum())]
    for d, size in enumerate([7, 5]):
        seq = examples[datasets == d]
        epochs = [seq[e * size:(e + 1) * size].tolist() for e in range(len(seq) // size)]
        assert all(sorted(e) == list(range(size)) for e in epochs)
        assert len(set(map(tuple, epochs))) > 1  # reshuffled per epoch
    # Random access: continuing from the middle gives the same draws.
    d2, e2, _ = stream.take(77, [int((datasets[:77] == 0).sum()), int((datasets[:77] == 1).sum())],
                            50)
    np.testing.assert_array_equal(d2, datasets[77:127])
    np.testing.assert_array_equal(e2, examples[77:127])


@pytest.mark.parametrize("kind,packing", CASES)
def test_eval_covers_each_example_once(kind, packing):
    examples = _data(kind, 37)
    hosts = [EvalBatches(examples, kind=kind, batch_size=4, max_length=MAX_LEN, pad_id=0,
                         packing=packing, process_index=h, process_count=2) for h in range(2)]
    assert len(hosts[0]) == len(list(hosts[0]))
    used = []
    for _ in range(2):  # re-iterable, same batches each pass
        used = []
        rows = set()
        for a, b in zip(*hosts):
            used += _keys(a, 0) + _keys(b, 1)
            rows.add(a.tokens.shape[0])
            rows.add(b.tokens.shape[0])
        assert sorted(used) == list(range(37)) and len(rows) == 1
    last = list(hosts[1])[-1]
    if not packing:  # 37 units in batches of 4: the last batch has 1 real unit, on host 0
        assert last.loss_mask.sum() == 0 and (last.segment_ids == 0).all()
    if kind == "sft" and not packing:
        assert [_keys(b) for b in hosts[0]][:2] == [[0, 1], [4, 5]]  # no shuffle


def test_parse_mixture():
    assert parse_mixture("data/train.jsonl") == [("data/train.jsonl", 1.0)]
    assert parse_mixture("a.jsonl=2") == [("a.jsonl", 1.0)]
    assert parse_mixture("dir/split=x/f.jsonl") == [("dir/split=x/f.jsonl", 1.0)]
    mix = parse_mixture("general.jsonl=0.312, math.jsonl=0.466,code.jsonl=0.222")
    assert [s for s, _ in mix] == ["general.jsonl", "math.jsonl", "code.jsonl"]
    np.testing.assert_allclose([w for _, w in mix], [0.312, 0.466, 0.222])
    np.testing.assert_allclose([w for _, w in parse_mixture("a=1,b=3")], [0.25, 0.75])
    for bad, match in [("", "data.train is empty"), ("a.jsonl,b.jsonl=1", "has no weight"),
                       ("a=x,b=1", "not a number"), ("a=0,b=1", "must be a finite number > 0"),
                       ("a=1,,b=1", "empty source")]:
        with pytest.raises(ValueError, match=match) as err:
            parse_mixture(bad)
        assert "data.train" in str(err.value)
    with pytest.raises(ValueError, match="a.jsonl=0.3,b.jsonl=0.7|general.jsonl=0.312"):
        parse_mixture("a.jsonl=,b=1")


@pytest.fixture
def fake_tokenize(monkeypatch):
    """Stand-in for jaxft.data.tokenize.load_examples: records its calls."""
    calls = []

    def load_examples(source, tokenizer, *, kind, max_length, **kwargs):
        calls.append((source, kind, max_length, kwargs))
        seed = {"a.jsonl": 1, "b.jsonl": 2}[source]
        examples = _sft(20, seed=seed) if kind == "sft" else _dpo(20, seed=seed)
        return types.SimpleNamespace(examples=examples, report=f"report of {source}")

    module = types.ModuleType("jaxft.data.tokenize")
    module.load_examples = load_examples
    monkeypatch.setitem(sys.modules, "jaxft.data.tokenize", module)
    return calls


def test_make_train_iterator_loads_each_source(fake_tokenize):
    tokenizer = types.SimpleNamespace(pad_token_id=None, eos_token_id=2)
    it = make_train_iterator("a.jsonl=0.25,b.jsonl=0.75", tokenizer, kind="dpo",
                             global_batch_size=4, max_length=64, packing=True, seed=0,
                             load_kwargs={"skip_invalid": True})
    assert fake_tokenize == [(s, "dpo", 32, {"skip_invalid": True}) for s in ("a.jsonl", "b.jsonl")]
    assert it.reports == {"a.jsonl": "report of a.jsonl", "b.jsonl": "report of b.jsonl"}
    assert it.index_offsets == [0, 20]
    batch = next(it)
    assert (batch.tokens[batch.segment_ids == 0] == 2).all()  # EOS pads without a pad id
    evals = make_eval_batches("a.jsonl,b.jsonl", tokenizer, kind="dpo", batch_size=4,
                              max_length=64, packing=False)
    assert fake_tokenize[-1][2] == 64  # unpacked: each sequence may use the whole row
    assert sorted(k for b in evals for k in _keys(b)) == list(range(40))
    assert evals.reports == it.reports


def test_packed_rows_are_shuffled():
    # Best-fit decreasing opens rows longest-first; unshuffled, the first batch would start
    # with the longest examples of the chunk.
    examples = _sft(200, hi=60)
    first = next(_make(examples, packing=True, global_batch_size=4, pack_chunk=200))
    first_lengths = sorted(len(examples[i]) for i in first.example_index[:, 0])
    assert first_lengths != sorted(len(e) for e in examples)[-4:]
