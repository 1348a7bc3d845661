"""KV-cache generation equals no-cache argmax decoding, stops at EOS, samples as configured."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference implementation (test extra)
from flax import nnx

import jaxft.inference.generate as gen
from jaxft.inference import sampler
from jaxft.inference.logits import filter_logits
from jaxft.models import create_model, get_preset, load_hf
from tests.hf_reference import make_hf_model

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "jaxft" / "assets" / "tokenizer"
# Lengths 3..40 in one batch: left padding to a 64-token bucket must not change any row.
PROMPTS = [[5, 17, 3], list(range(20, 37)), [(7 * i) % 90 + 3 for i in range(40)]]
NEW = 6


@functools.cache
def _model(family: str, tmp_root: str):
    folder = Path(tmp_root) / family
    hf = make_hf_model(family)
    # Random init makes attention almost uniform, so a wrong position or mask would barely move
    # the logits; sharpen it so the test notices such mistakes.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    hf.save_pretrained(folder)
    return load_hf(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gen_models"))
    return lambda family: _model(family, root)


_FORWARDS: dict[int, object] = {}


def _full_logits(model, tokens) -> np.ndarray:
    """Full forward without a cache (jitted once per model): tokens [1, L] -> [1, L, V] f32."""
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t).astype(jnp.float32))
        _FORWARDS[id(model)] = functools.partial(fwd, state)
    return np.asarray(_FORWARDS[id(model)](jnp.asarray(tokens, jnp.int32)))


def _reference_greedy(model, prompt, n, length):
    """Argmax decoding that re-runs the whole forward on the growing sequence each step. The
    sequence sits in a `length`-token buffer (one compile); causal attention ignores the rest."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, length), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(np.argmax(_full_logits(model, buf)[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"])
def test_greedy_with_cache_equals_no_cache_argmax(models, family):
    model = models(family)
    got = gen.generate(model, PROMPTS, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    length = max(map(len, PROMPTS)) + NEW
    want = [_reference_greedy(model, p, NEW, length) for p in PROMPTS]
    assert got == want


def test_decode_steps_over_cache_prefixes_equal_no_cache_argmax(models, monkeypatch):
    """Decode attention reads the cache's filled prefix only (`attention.single_query`): with
    small prefixes (16 slots at this length), 19 steps after a 64-slot prompt bucket cross one, and the
    tokens are still no-cache argmax decoding's."""
    from jaxft.models import attention

    monkeypatch.setattr(attention, "PREFIX_BLOCK", 8)
    real_lengths, traced = attention.prefix_lengths, []
    monkeypatch.setattr(attention, "prefix_lengths", lambda S, block=None: traced.append(S) or real_lengths(S, block))
    model, new = models("qwen3"), 19  # a cache length (64 + 19) no other test traces
    got = gen.generate(model, PROMPTS, max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    assert 64 + new in traced and real_lengths(64 + new) == [16, 32, 48, 64, 80, 83]  # traced afresh
    length = max(map(len, PROMPTS)) + new
    assert got == [_reference_greedy(model, p, new, length) for p in PROMPTS]


def test_samples_from_one_shared_prefill_equal_no_cache_argmax(models):
    """Greedy samples through the sampler's shared prefill (each prompt's cache copied to its 3
    rows; 2 prompts x 3 samples a batch, so prompts of different lengths share batches) equal
    no-cache argmax decoding, every sample."""
    model = models("llama")
    rows = sampler.sample_ids(model, PROMPTS, samples=3, max_new_tokens=NEW, batch_size=6)
    length = max(map(len, PROMPTS)) + NEW
    for prompt, samples in zip(PROMPTS, rows):
        want = _reference_greedy(model, prompt, NEW, length)
        assert [s[:NEW] for s in samples] == [want] * 3


def test_sliding_window_generation_equals_transformers_greedy(models):
    """Gemma 3 (window 5, 5:1 local / global layers, both soft-caps off) decodes 6 tokens past a
    17-token prompt exactly as transformers' greedy generate with its own cache."""
    model = models("gemma3_text")
    hf = make_hf_model("gemma3_text")
    with torch.no_grad():  # the same sharpening as `_model`
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    prompt = PROMPTS[1]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    got = gen.generate(model, [prompt], max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert got == [want]


def test_stops_at_eos_and_pads_finished_rows(models):
    model = models("llama")
    # Same batch shape everywhere (3 rows, 64-token bucket): one compile serves the whole test.
    kw = dict(max_new_tokens=NEW, pad_token_id=0, prompt_bucket=64)
    free = gen.generate(model, PROMPTS, eos_token_id=[], **kw)
    # Make row 0's third greedy token the EOS: row 0 must stop there, the others at their own.
    eos = free[0][2]
    out, steps = gen.generate_array(model, PROMPTS, eos_token_id=eos, **kw)
    cut = gen.generate(model, PROMPTS, eos_token_id=eos, **kw)
    for row, free_row, cut_row in zip(out.tolist(), free, cut):
        k = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert cut_row == free_row[:k]  # cut after the first EOS, EOS included
        assert row[:k] == free_row[:k] and all(t == 0 for t in row[k:])  # then only pad
    assert cut[0][-1] == eos and len(cut[0]) <= 3

    # When every row has hit EOS the loop ends early.
    out, steps = gen.generate_array(model, [PROMPTS[0]] * 3, eos_token_id=eos, **kw)
    assert steps == free[0].index(eos) + 1 < NEW
    assert (out[:, steps:] == 0).all()
    # Several EOS ids: whichever comes first stops the row.
    two = gen.generate(model, PROMPTS, eos_token_id=[free[0][1], eos], **kw)
    assert two[0] == free[0][:2]


def test_sampling_filters_and_seeds(models):
    model = models("llama")
    kw = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    greedy = gen.generate(model, PROMPTS, **kw)
    # Filters that leave one candidate reduce sampling to greedy.
    assert gen.generate(model, PROMPTS, temperature=1.0, top_k=1, seed=3, **kw) == greedy
    assert gen.generate(model, PROMPTS, temperature=0.7, top_p=1e-6, seed=3, **kw) == greedy

    # A random tiny model's distribution is nearly flat: high-temperature samples vary by seed.
    a = gen.generate(model, PROMPTS, temperature=2.0, seed=1, **kw)
    assert a == gen.generate(model, PROMPTS, temperature=2.0, seed=1, **kw)
    assert a != gen.generate(model, PROMPTS, temperature=2.0, seed=2, **kw)
    assert a != greedy

    # top_k=3: every sampled token is among the 3 most likely given its (sampled) prefix.
    sampled = gen.generate(model, PROMPTS, temperature=5.0, top_k=3, seed=0, **kw)
    for prompt, new in zip(PROMPTS, sampled):
        logits = _full_logits(model, np.asarray([prompt + new]))[0]
        for i, tok in enumerate(new):
            top3 = np.argsort(logits[len(prompt) + i - 1])[-3:]
            assert tok in top3
    assert len({t for row in sampled for t in row}) > len(PROMPTS)  # it did sample, not argmax


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, 1.0, **kw)))[0].tolist()
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=0, top_p=0.75) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.75
    assert kept(top_k=0, top_p=0.85) == [True, True, True, False]
    assert kept(top_k=0, top_p=1.0) == [True] * 4


@pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="no bundled tokenizer")
def test_generate_text_chat_has_one_bos(monkeypatch):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model = create_model(get_preset("tiny").replace(num_layers=1))  # 1 layer: faster, same vocab
    seen = []
    real_sample_ids = sampler.sample_ids

    def spy(model, prompt_ids, **kw):
        seen.extend(prompt_ids)
        return real_sample_ids(model, prompt_ids, **kw)

    monkeypatch.setattr(sampler, "sample_ids", spy)
    prompts = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "Tom has 4 apples.",
    ]
    texts = gen.generate_text(model, tok, prompts, chat=True, batch_size=2, max_new_tokens=5)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert len(seen) == 3
    for ids in seen:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert tok.decode(ids).endswith("<|assistant|>\n")
    # The string prompt was wrapped as a user message.
    assert "<|user|>\nTom has 4 apples." in tok.decode(seen[2])
    # Plain strings without chat are tokenized as they are, with the tokenizer's one BOS.
    assert gen.encode_prompts(tok, ["Tom has"])[0] == tok("Tom has")["input_ids"]


def test_bench_generate_compares_with_transformers_on_the_same_weights(capsys):
    """`jaxft bench --generate --compare torch` on a 1-layer tiny model: both samplers decode the
    left-padded batch of prompts of different lengths to the same greedy tokens, and the report
    says tokens/s and their ratio."""
    from jaxft import cli
    from jaxft.perf.bench_generate import format_generate_bench, run_generate_bench

    report = run_generate_bench(preset="tiny", layers=1, batch_size=3, new_tokens=5, prompt_length=12, rounds=1,
                                compare=("torch",))
    assert report["greedy_rows_equal"] == 3
    assert report["config"]["prompt_lengths"] == [12, 9, 6]
    assert report["ratio"] == pytest.approx(report["jaxft"]["tokens_per_sec"] / report["torch"]["tokens_per_sec"])
    assert "jaxft / torch tokens/s" in format_generate_bench(report)
    with pytest.raises(SystemExit, match="--compare 'tunix' with --generate: choose from torch"):
        cli.main(["bench", "--generate", "--compare", "tunix"])
