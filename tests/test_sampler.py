"""The evaluation sampler (`jaxft.inference.sampler`): per-row seeds independent of batching, k
samples from one prefill, stop strings on text, data-parallel rows equal to one device."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import jax
import pytest

from jaxft.inference import logits, sampler
from jaxft.inference.generate import encode_prompts, generate
from jaxft.inference.completions import Completion, eos_ids, finish, sample_completions
from jaxft.inference.sampler import sample_ids
from jaxft.models import create_model, get_preset
from jaxft.parallel import sharding

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "jaxft" / "assets" / "tokenizer"
pytestmark = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="no bundled tokenizer")
# 3 to 25 tokens: one 32-token bucket, one compiled shape per batch layout.
PROMPTS = ["Tom has 4 apples and buys 3 more. How many now?", "Hi", "What is 2 + 3?",
           "A train leaves at noon at sixty miles an hour."]
# A nearly flat random model: temperature 1.5 makes every row a different, seed-dependent sample.
SAMPLING = dict(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95)


@functools.cache
def _tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@functools.cache
def _model():
    return create_model(get_preset("tiny").replace(num_layers=1))


@functools.cache
def one_device():
    return sharding.make_mesh(devices=jax.devices()[:1])


def sample(prompts, **kw):
    """sample_completions on one device (the tests' 8 CPU devices only where the test says so:
    each program compiles and runs faster on one)."""
    kw.setdefault("mesh", one_device())
    return sample_completions(_model(), _tokenizer(), prompts, **kw)


def test_k_samples_equal_k_single_runs_with_the_seeds_and_batching_does_not_matter():
    """Sample j of prompt i (k = 3 from one prefill, 4 prompts of different lengths in one
    batch) equals sampling prompt i alone with seed + j; batch size 1 vs 6 and a shuffled prompt
    order give the same completions, returned in input order."""
    together = sample(PROMPTS, samples=3, seed=7, batch_size=6, **SAMPLING)
    assert [len(c) for c in together] == [3] * len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        for j in range(3):
            alone = sample([prompt], samples=1, seed=7 + j, **SAMPLING)[0][0]
            assert alone == together[i][j], (i, j)
    # The samples differ from each other (they are samples, not copies of one).
    assert len({c.text for row in together for c in row}) == 3 * len(PROMPTS)
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = sample([PROMPTS[i] for i in order], samples=3, seed=7, batch_size=1,
                                  **SAMPLING)
    assert [shuffled[order.index(i)] for i in range(len(PROMPTS))] == together
    # The seed matters.
    assert sample(PROMPTS, samples=3, seed=8, batch_size=6, **SAMPLING) != together


def test_greedy_samples_are_identical_and_equal_generate():
    model, tok = _model(), _tokenizer()
    out = sample(PROMPTS, samples=2, max_new_tokens=8, batch_size=4)
    want = generate(model, encode_prompts(tok, PROMPTS), max_new_tokens=8, eos_token_id=eos_ids(tok, model.cfg),
                    mesh=one_device())
    for row, ids in zip(out, want):
        assert row[0] == row[1] and row[0].token_ids == ids
        assert row[0].finish_reason == ("eos" if ids[-1] in eos_ids(tok, model.cfg) else "length")
        assert row[0].text == tok.decode(ids, skip_special_tokens=True)


def _spanning_stop(tok, ids):
    """(stop string, k): a 2-character string made of the last character of token k's text and
    the first of token k + 1's, occurring first exactly there in the completion's text."""
    text = tok.decode(ids, skip_special_tokens=True)
    for k in range(len(ids) - 1):
        a = len(tok.decode(ids[:k + 1], skip_special_tokens=True))
        b = len(tok.decode(ids[:k + 2], skip_special_tokens=True))
        before = tok.decode(ids[:k + 1], skip_special_tokens=True)
        stop = text[a - 1:a + 1]
        if 0 < a < b and text.startswith(before) and stop.isprintable() and "\ufffd" not in stop:
            if text.find(stop) == a - 1:
                return stop, k
    raise AssertionError(f"no stop string spans two tokens of {text!r}")


def test_a_stop_string_spanning_two_tokens_cuts_the_text_and_ends_the_row():
    model, tok = _model(), _tokenizer()
    kw = dict(max_new_tokens=24, temperature=1.0, seed=3)
    free = sample(PROMPTS[:2], **kw)
    stop, k = _spanning_stop(tok, free[0][0].token_ids)
    got = sample(PROMPTS[:2], stop=["never appears \u2603", stop], **kw)
    full = free[0][0].text
    assert got[0][0] == Completion(full[:full.find(stop)], free[0][0].token_ids[:k + 2], "stop")
    # The other row, whatever it holds, is cut at its own first stop string (or not at all).
    other = free[1][0]
    if stop in other.text:
        assert got[1][0].finish_reason == "stop" and got[1][0].text == other.text[:other.text.find(stop)]
    else:
        assert got[1][0] == other
    # The row stops on the host between decode chunks: it ran fewer than max_new_tokens.
    ids = encode_prompts(tok, PROMPTS[:1])
    text_of = functools.partial(tok.decode, skip_special_tokens=True)
    rows = sample_ids(model, ids, eos_ids=[], stop_check=lambda t: stop in text_of(t), chunk=2, mesh=one_device(),
                      **kw)
    assert k + 2 <= len(rows[0][0]) <= k + 2 + 2 < kw["max_new_tokens"]


def test_finish_cuts_at_eos_then_stop():
    def decode(ids):
        return "".join({1: "ab", 2: "c#", 3: "#d", 9: ""}[t] for t in ids)

    assert finish([1, 2, 9, 3], eos_ids=[9], decode=decode) == Completion("abc#", [1, 2, 9], "eos")
    assert finish([1, 2, 3, 9], eos_ids=[9], stop=["##"], decode=decode) == Completion("abc", [1, 2, 3], "stop")
    assert finish([1, 2, 3, 9], eos_ids=[9], stop=["b", "##"], decode=decode) == Completion("a", [1], "stop")
    assert finish([1, 3], eos_ids=[9], stop=["x"], decode=decode) == Completion("ab#d", [1, 3], "length")
    # An EOS before the stop string wins: the text after an EOS is never read.
    assert finish([1, 9, 2, 3], eos_ids=[9], stop=["##"], decode=decode) == Completion("ab", [1, 9], "eos")


def test_data_parallel_rows_equal_one_device():
    """The tests' 8 CPU devices: rows split over a ("data",) mesh of 8 give what one device gives."""
    assert jax.device_count() == 8
    spread = sample(PROMPTS, seed=1, batch_size=6, samples=3, mesh=None, **SAMPLING)
    assert spread == sample(PROMPTS, seed=1, batch_size=6, samples=3, **SAMPLING)


def test_tensor_and_fsdp_parallel_sampling_equals_one_device():
    """A (data 2, fsdp 2, tensor 2) mesh of the 8 CPU devices: rows split over data and fsdp,
    the params by the rules table (heads and MLP over tensor, the rest over fsdp), so every
    matmul of the prefill and decode runs sharded; the samples equal one device's."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    split = sample(PROMPTS, seed=1, batch_size=4, samples=2, mesh=mesh, **SAMPLING)
    assert split == sample(PROMPTS, seed=1, batch_size=4, samples=2, **SAMPLING)


def test_progress_bar_counts_tokens(capsys):
    sample(PROMPTS[:2], max_new_tokens=5, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err or "tok_s" in err


def test_finished_rows_leave_the_batch_and_the_rest_decode_as_alone(monkeypatch):
    """Three of four rows end early on EOS: the live row moves to a batch of 2, then 1 (between
    2-step chunks), and every row's tokens equal its prompt sampled alone."""
    model, tok = _model(), _tokenizer()
    ids = encode_prompts(tok, PROMPTS)
    kw = dict(max_new_tokens=16, temperature=1.0, seed=2, mesh=one_device(), chunk=2)
    free = [r[0] for r in sample_ids(model, ids, **kw)]
    eos = list(dict.fromkeys([free[0][2], free[1][3], free[2][1]]))
    gathers = []
    real_gather = sampler.gather_rows
    monkeypatch.setattr(sampler, "gather_rows", lambda *a, **k: gathers.append(len(a[3])) or real_gather(*a, **k))
    together = [finish(r[0], eos_ids=eos) for r in sample_ids(model, ids, eos_ids=eos, **kw)]
    assert gathers and gathers[0] < 4  # the batch shrank
    for prompt, got, free_row in zip(ids, together, free):
        alone = finish(sample_ids(model, [prompt], eos_ids=eos, **kw)[0][0], eos_ids=eos)
        assert got == alone
        assert got.token_ids == finish(free_row, eos_ids=eos).token_ids  # the same tokens as without EOS, cut
    assert sum(c.finish_reason == "eos" for c in together) >= 3


def test_greedy_argmax_is_jnp_argmax_with_ties_infinities_and_nan():
    """The sampler's argmax (a max, then the first index holding it) picks what jnp.argmax picks:
    the first of tied maxima, among -inf rows, and the first NaN."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (64, 37)).astype(np.float32)  # many ties
    x[3, 5] = x[7, 0] = x[7, 9] = np.nan
    x[11] = -np.inf
    x[12, :3] = np.inf
    want = np.argmax(np.nan_to_num(x, nan=np.inf, posinf=1e30), -1)  # NaN first, then +inf
    assert (np.asarray(logits.argmax(jnp.asarray(x))) == want).all()
    assert (np.asarray(logits.argmax(jnp.asarray(x))) == np.asarray(jnp.argmax(jnp.asarray(x), -1))).all()
