"""Packing and bucketing: no token lost, segments/positions well formed, pairs intact, little
padding, fast enough for real datasets."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxft.data.batch import PreferenceExample, SFTExample
from jaxft.data.packing import (
    bucket_for, bucket_lengths, pack_lengths, pack_preference, pack_sft, padding_fractions,
    pairs_to_dpo_batch, rows_to_dpo_batch, rows_to_sft_batch)

PAD = 0


def _seq(key: int, n: int) -> np.ndarray:
    # Token = key * 1000 + position: every (example, token) pair is unique and traceable.
    return (key * 1000 + np.arange(1, n + 1)).astype(np.int32)


def _sft(lengths):
    return [SFTExample(_seq(i, n), (np.arange(n) % 2).astype(np.int32), index=100 + i)
            for i, n in enumerate(lengths)]


def _pairs(lengths):
    return [PreferenceExample(_seq(2 * i, c), np.ones(c, np.int32), _seq(2 * i + 1, r),
                              (np.arange(r) > 0).astype(np.int32), index=500 + i)
            for i, (c, r) in enumerate(lengths)]


def _check_rows(batch, max_length, max_segments):
    """Layout invariants shared by SFT and DPO batches; returns (row, segment) -> tokens."""
    assert batch.tokens.shape[1] == max_length
    segments = {}
    for r in range(batch.tokens.shape[0]):
        seg = batch.segment_ids[r]
        real = seg > 0
        # Segments are a prefix of the row, numbered 1..k in order, each contiguous.
        k = int(real.sum())
        assert real[:k].all() and not real[k:].any()
        ids = seg[:k]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        if k:
            assert ids[0] == 1 and ids[-1] <= max_segments
        for s in np.unique(ids):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(batch.positions[r, where], np.arange(len(where)))
            segments[(r, int(s))] = batch.tokens[r, where]
        # Padding: pad id, segment 0, position 0, no loss.
        assert (batch.tokens[r, k:] == PAD).all() and (batch.positions[r, k:] == 0).all()
        assert (batch.loss_mask[r, k:] == 0).all()
    return segments


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 64).flatmap(lambda L: st.tuples(
    st.just(L), st.lists(st.integers(1, L), min_size=1, max_size=60), st.integers(1, 8))))
def test_pack_sft_keeps_every_token_once(case):
    max_length, lengths, max_segments = case
    examples = _sft(lengths)
    rows = pack_sft(examples, max_length, max_segments)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    batch = rows_to_sft_batch([[examples[i] for i in row] for row in rows], length=max_length,
                              pad_id=PAD, num_segments=max_segments)
    segments = _check_rows(batch, max_length, max_segments)
    # The multiset of (example, token) is preserved: each segment is exactly one example.
    seen = collections.Counter()
    for (r, s), tokens in segments.items():
        key = int(batch.example_index[r, s - 1])
        ex = examples[key - 100]
        np.testing.assert_array_equal(tokens, ex.input_ids)
        np.testing.assert_array_equal(batch.loss_mask[r, batch.segment_ids[r] == s],
                                      ex.loss_mask)
        seen[key] += 1
    assert seen == collections.Counter(e.index for e in examples)
    # example_index is -1 exactly where a row has no such segment.
    n_seg = batch.segment_ids.max(axis=1)
    for r in range(len(rows)):
        assert (batch.example_index[r, n_seg[r]:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 64).flatmap(lambda L: st.tuples(
    st.just(L),
    st.lists(st.integers(1, L - 1).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, L - c))),
             min_size=1, max_size=40),
    st.integers(2, 8))))
def test_pack_preference_keeps_pairs_intact(case):
    max_length, lengths, max_segments = case
    pairs = _pairs(lengths)
    rows = pack_preference(pairs, max_length, max_segments)
    assert sorted(i for row in rows for i in row) == list(range(len(pairs)))
    slots = len(rows) * (max_segments // 2)
    batch = rows_to_dpo_batch([[pairs[i] for i in row] for row in rows], length=max_length,
                              pad_id=PAD, num_pair_slots=slots)
    segments = _check_rows(batch, max_length, max_segments)
    assert batch.pair_mask.sum() == len(pairs) and batch.pair_mask.shape == (slots,)
    for p in np.flatnonzero(batch.pair_mask):
        ex = pairs[batch.pair_index[p] - 500]
        # Same row, consecutive segments, chosen first; the lookups point at the right tokens.
        assert batch.chosen_row[p] == batch.rejected_row[p]
        assert batch.rejected_segment[p] == batch.chosen_segment[p] + 1
        row = batch.chosen_row[p]
        np.testing.assert_array_equal(segments[(row, batch.chosen_segment[p])], ex.chosen_ids)
        np.testing.assert_array_equal(segments[(row, batch.rejected_segment[p])],
                                      ex.rejected_ids)
        rej = batch.segment_ids[row] == batch.rejected_segment[p]
        np.testing.assert_array_equal(batch.loss_mask[row, rej], ex.rejected_mask)
    assert len(segments) == 2 * len(pairs)
    unused = batch.pair_mask == 0
    assert (batch.pair_index[unused] == -1).all() and (batch.chosen_segment[unused] >= 1).all()


def test_unpacked_dpo_rows_alternate_chosen_rejected():
    pairs = _pairs([(3, 5), (6, 2)])
    batch = pairs_to_dpo_batch([pairs[0], None, pairs[1]], length=8, pad_id=PAD)
    assert batch.tokens.shape == (6, 8)
    np.testing.assert_array_equal(batch.chosen_row, [0, 2, 4])
    np.testing.assert_array_equal(batch.rejected_row, [1, 3, 5])
    np.testing.assert_array_equal(batch.pair_mask, [1, 0, 1])
    np.testing.assert_array_equal(batch.pair_index, [500, -1, 501])
    np.testing.assert_array_equal(batch.tokens[4, :6], pairs[1].chosen_ids)
    np.testing.assert_array_equal(batch.tokens[5, :2], pairs[1].rejected_ids)
    assert (batch.segment_ids[2:4] == 0).all() and (batch.loss_mask[2:4] == 0).all()


def test_too_long_or_empty_examples_are_rejected():
    with pytest.raises(ValueError, match="more than max_length 16"):
        pack_sft(_sft([4, 17, 3]), 16)
    with pytest.raises(ValueError, match="empty"):
        pack_lengths(np.array([3, 0]), 16, 4)
    with pytest.raises(ValueError, match="chosen"):  # a pair must fit one row
        pack_preference(_pairs([(10, 10)]), 16)


def test_segment_cap_bounds_rows():
    rows = pack_lengths(np.ones(100, np.int64), 1024, 8)
    assert len(rows) == 13 and max(len(r) for r in rows) == 8


def test_packing_padding_is_small_on_realistic_lengths():
    lengths = np.random.default_rng(0).integers(20, 201, 20_000)
    rows = pack_lengths(lengths, 1024, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(lengths[r].sum() <= 1024 for r in rows)
    padding = 1 - lengths.sum() / (len(rows) * 1024)
    assert padding < 0.05, padding


def test_buckets():
    assert bucket_lengths(1000) == [64, 128, 256, 512, 1000]
    assert bucket_lengths(1024) == [64, 128, 256, 512, 1024]
    assert bucket_lengths(32) == [32]
    buckets = bucket_lengths(1024)
    assert [bucket_for(n, buckets) for n in (1, 64, 65, 1024)] == [64, 64, 128, 1024]
    with pytest.raises(ValueError):
        bucket_for(1025, buckets)


def test_padding_fractions_rank_the_strategies():
    rng = np.random.default_rng(0)
    fractions = padding_fractions(_sft(rng.integers(20, 201, 2000).tolist()), 1024,
                                  batch_size=16)
    assert fractions["packed"] < 0.05 < fractions["bucketed"] < fractions["padded"]
    pair = padding_fractions(_pairs([(100, 100)] * 64), 256, batch_size=8)
    assert pair["padded"] == pytest.approx(1 - 200 / 512)
    assert pair["bucketed"] == pytest.approx(1 - 200 / 256)
    assert pair["packed"] == pytest.approx(1 - 200 / 256)  # one pair per 256-token row
    assert np.isnan(padding_fractions(_pairs([(100, 100)]), 128)["packed"])  # pair > row
