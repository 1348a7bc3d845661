"""The background batch thread: the same batches in the same order as reading them in the loop,
the data state of each, and errors raised where the loop reads."""

import numpy as np
import pytest

from jaxft.data.batch import SFTExample
from jaxft.data.pipeline import BatchIterator
from jaxft.parallel.prefetch import Prefetcher
from jaxft.parallel.sharding import make_mesh


def _iterator(n=40):
    rng = np.random.default_rng(0)
    examples = [SFTExample(rng.integers(3, 50, k).astype(np.int32), np.ones(k, np.int32), index=i)
                for i, k in enumerate(rng.integers(4, 30, n))]
    return BatchIterator([examples], kind="sft", global_batch_size=8, max_length=32, pad_id=0, seed=1)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_and_data_states_equal_reading_in_the_loop(depth):
    mesh = make_mesh(data=-1)
    plain, ahead = _iterator(), Prefetcher(_iterator(), mesh, depth=depth)
    try:
        for _ in range(12):  # past an epoch (5 batches of 8)
            want = next(plain)
            got = next(ahead)
            np.testing.assert_array_equal(np.asarray(got.batch["tokens"]), want.tokens)
            np.testing.assert_array_equal(np.asarray(got.batch["loss_mask"]), want.loss_mask)
            assert got.data_state == plain.get_state() and got.real_tokens == plain.real_tokens
            assert got.length == want.tokens.shape[1] and got.epoch == plain.epoch
    finally:
        ahead.close()


class _Broken:
    """Three good batches, then a data error (as a bad record found mid-stream would raise)."""

    def __init__(self):
        self.inner, self.count = _iterator(), 0

    def __next__(self):
        self.count += 1
        if self.count > 3:
            raise ValueError("data/train.jsonl line 9: field 'text' is empty")
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_error_in_the_thread_is_raised_by_next():
    ahead = Prefetcher(_Broken(), make_mesh(data=-1), depth=2)
    try:
        for _ in range(3):
            next(ahead)
        with pytest.raises(ValueError, match="line 9"):
            next(ahead)
    finally:
        ahead.close()
