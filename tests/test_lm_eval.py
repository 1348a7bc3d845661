"""jaxft as an lm-evaluation-harness model (`jaxft.eval.lm_model.JaxftLM`, `lm_eval:TASK`): its
log-likelihoods equal a direct forward pass and lm-eval's own HFLM on the same checkpoint, and
small offline tasks (local JSONL, task YAMLs in a folder) run end to end."""

import json
import math

import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.errors import ConfigError
from jaxft.eval.benchmarks import EvalSettings, get_benchmark
from jaxft.eval.lm_model import JaxftLM, length_bucket
from jaxft.models import create_model, get_preset, save_hf

PAIRS = [("Question: What is 2 + 3?\nAnswer:", " 5"), ("The cat sat on the ", "mat."), ("", "Hello world"),
         ("Hello", " world, again and again"), ("A", "B")]
DOC = "The quick brown fox jumps over the lazy dog. It was not amused."


@pytest.fixture(scope="module")
def tiny():
    tok = load_bundled_tokenizer()
    cfg = get_preset("tiny").replace(num_layers=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    return create_model(cfg, seed=1), tok


@pytest.fixture(scope="module")
def lm(tiny):
    return JaxftLM(model=tiny[0], tokenizer=tiny[1], batch_size=8)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def logits_of(model, rows):
    """The model's full logits [8, 96, V] for up to 8 rows of up to 96 tokens, right-padded (causal
    attention never reads the padding): one compiled shape for every reference in this file."""
    assert len(rows) <= 8 and max(map(len, rows)) <= 96
    inputs = np.zeros((8, 96), np.int32)
    for b, ids in enumerate(rows):
        inputs[b, :len(ids)] = ids
    return np.asarray(forward(model, inputs), np.float64)


def direct(model, rows):
    """[(sum of the last n tokens' log-probs, all argmax)] of rows [(ids, n)], from the model's
    full logits, in float64 on the host."""
    all_logits = logits_of(model, [ids[:-1] for ids, _ in rows])
    out = []
    for (ids, n), logits in zip(rows, all_logits):
        logits = logits[:len(ids) - 1]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets = np.asarray(ids[1:])
        picked = logp[np.arange(len(targets)), targets][-n:]
        out.append((float(picked.sum()), bool((logits.argmax(-1)[-n:] == targets[-n:]).all())))
    return out


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_a_direct_forward_pass(tiny, lm):
    model, tok = tiny
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    rows = []
    for context, continuation in PAIRS:
        if context:  # HFLM's split: encode the whole, the context's trailing space goes with the continuation
            stripped = context.rstrip()
            whole = tok.encode(stripped + context[len(stripped):] + continuation)
            n_cont = len(whole) - len(tok.encode(stripped))
        else:  # empty context: BOS stands for it
            whole = [tok.bos_token_id] + tok.encode(continuation, add_special_tokens=False)
            n_cont = len(whole) - 1
        rows.append((whole, n_cont))
    for (logp, greedy), want in zip(got, direct(model, rows)):
        assert logp == pytest.approx(want[0], rel=1e-5, abs=1e-5)
        assert greedy == want[1]


def test_is_greedy_and_left_truncation(tiny):
    model, tok = tiny
    lm = JaxftLM(model=model, tokenizer=tok, batch_size=8, max_length=12)
    context = tok.encode("Once upon")
    assert len(context) + 3 <= 13  # whole within the window
    ids = list(context)
    for _ in range(3):  # the model's own greedy continuation
        ids.append(int(logits_of(model, [ids])[0, len(ids) - 1].argmax()))
    greedy = ids[len(context):]
    wrong = greedy[:2] + [(greedy[2] + 1) % 512]
    (lp_greedy, is_greedy), (lp_wrong, is_wrong), (lp_long, _) = lm.score_tokens(
        [(context, greedy), (context, wrong), (context * 3, greedy)])
    assert is_greedy and not is_wrong
    assert lp_greedy > lp_wrong
    # Longer than max_length + 1 tokens: only the last 13 are read (the first is not an input)
    assert len(context * 3 + greedy) > 13
    ((want_long, _),) = direct(model, [((context * 3 + greedy)[-13:], 3)])
    assert lp_long == pytest.approx(want_long, rel=1e-5, abs=1e-5)
    assert lp_greedy != pytest.approx(lp_long, rel=1e-3)  # truncation changed the context, not a no-op


def test_rolling_loglikelihood_of_a_short_document_is_the_plain_sum(tiny, lm):
    model, tok = tiny
    (rolled,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(DOC,)]), disable_tqdm=True)
    ids = [lm.prefix_token_id] + tok.encode(DOC)  # as HFLM: the prefix token, then the encoded text
    ((want, _),) = direct(model, [(ids, len(ids) - 1)])
    assert rolled == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_under_a_training_mesh_the_sharded_params_score_the_same(tiny, lm):
    import jax

    from jaxft.parallel.sharding import make_mesh

    model, tok = tiny
    mesh = make_mesh(data=2, fsdp=4)
    sharded = create_model(model.cfg, seed=1, mesh=mesh)  # the fixture's weights, split over fsdp
    want = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    with jax.set_mesh(mesh):
        ours = JaxftLM(model=sharded, tokenizer=tok, batch_size=4)
        assert ours.mesh is None and ours.batch_size == 8  # the ambient mesh's 8 row blocks
        assert not sharded.embed_tokens[...].sharding.is_fully_replicated
        got = ours.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb


def test_length_buckets_are_powers_of_two_within_the_window():
    assert [length_bucket(n, 1024) for n in (1, 32, 33, 100, 1000)] == [32, 32, 64, 128, 1024]
    assert length_bucket(100, 80) == 100 and length_bucket(70, 80) == 80


def test_matches_lm_evals_hflm_on_the_same_checkpoint(tiny, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    save_hf(model, tmp_path, tokenizer=tok)
    ours = JaxftLM(pretrained=str(tmp_path), batch_size=8, max_length=16)
    theirs = HFLM(pretrained=str(tmp_path), backend="causal", device="cpu", dtype="float32", batch_size=4,
                  max_length=16, logits_cache=False)
    ll = requests("loglikelihood", PAIRS)
    rolling = requests("loglikelihood_rolling", [(DOC,), ("Short text.",)])  # DOC spans several windows
    got, want = ours.loglikelihood(ll, disable_tqdm=True), theirs.loglikelihood(ll, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
    got_r = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    want_r = theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert got_r == pytest.approx(want_r, rel=1e-5, abs=1e-4)


def write_tasks(folder):
    """Three offline tasks over local JSONL: multiple choice, rolling perplexity, generation."""
    mc = [{"question": "What is 2 + 3?", "choices": ["4", "5", "6"], "answer": 1},
          {"question": "Which is a colour?", "choices": ["red", "table", "seven"], "answer": 0},
          {"question": "What do cats say?", "choices": ["woof", "moo", "meow"], "answer": 2}]
    docs = [{"text": DOC}, {"text": "Small models write small texts."}]
    gen = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "Say hi.", "answer": "hi"}]
    for name, rows in (("mc", mc), ("docs", docs), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def yaml(name, data, body):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
            f"test_split: test\n{body}")

    yaml("tiny_mc", "mc.jsonl", 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    yaml("tiny_ppl", "docs.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n')
    yaml("tiny_gen", "gen.jsonl", 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
         "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return mc


def test_offline_tasks_run_end_to_end_with_jaxfts_numbers(tiny, tmp_path):
    model, tok = tiny
    mc = write_tasks(tmp_path)
    bench = get_benchmark("lm_eval:tiny_mc,tiny_ppl")
    result = bench.run(model, tok, EvalSettings(data=str(tmp_path), batch_size=8))
    assert result.benchmark == "lm_eval:tiny_mc,tiny_ppl" and result.n == 5
    lm = JaxftLM(model=model, tokenizer=tok, batch_size=8)
    hits = []
    for doc in mc:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = lm.loglikelihood(requests("loglikelihood", [(context, " " + c) for c in doc["choices"]]),
                                  disable_tqdm=True)
        hits.append(int(np.argmax([s for s, _ in scores])) == doc["answer"])
    assert result.metrics["tiny_mc/acc"] == pytest.approx(np.mean(hits))
    assert set(result.metrics) >= {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_mc/acc_stderr",
                                   "tiny_ppl/word_perplexity", "tiny_ppl/bits_per_byte"}
    (rolled,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(DOC,)]), disable_tqdm=True)
    mine = [s for s in result.samples if s["task"] == "tiny_ppl" and s["doc_id"] == 0][0]
    assert mine["completion"][0] == pytest.approx(rolled, rel=1e-6)
    mc_samples = [s for s in result.samples if s["task"] == "tiny_mc"]
    assert [s["correct"] for s in sorted(mc_samples, key=lambda s: s["doc_id"])] == hits
    assert all(s["reference"] is not None and "Question:" in s["prompt"] for s in mc_samples)
    json.dumps(result.samples)  # --samples-out writes them as JSON lines


def test_task_folders_are_indexed_once_and_again_for_a_new_task(tmp_path):
    from jaxft.eval.benchmarks.lm_harness import task_manager

    write_tasks(tmp_path)
    first, names = task_manager(("tiny_mc", "tiny_ppl"), [str(tmp_path)], flag="lm_eval:x")
    assert names == ["tiny_mc", "tiny_ppl"] and "arc_easy" not in first.all_tasks  # the folder alone
    assert task_manager(("tiny_mc",), [str(tmp_path)], flag="lm_eval:x")[0] is first  # kept
    (tmp_path / "tiny_mc2.yaml").write_text((tmp_path / "tiny_mc.yaml").read_text().replace("tiny_mc", "tiny_mc2"))
    again, names = task_manager(("tiny_mc2",), [str(tmp_path)], flag="lm_eval:x")
    assert names == ["tiny_mc2"] and again is not first and "tiny_mc2" in again.all_subtasks


def test_generate_until_task_runs_on_jaxfts_sampler(tiny, tmp_path):
    pytest.importorskip("jaxft.inference.sampler")
    from jaxft.inference.completions import sample_completions

    model, tok = tiny
    write_tasks(tmp_path)
    result = get_benchmark("lm_eval:tiny_gen").run(model, tok, EvalSettings(data=str(tmp_path), batch_size=8))
    assert result.n == 2 and 0.0 <= result.metrics["tiny_gen/exact_match"] <= 1.0
    samples = sorted(result.samples, key=lambda s: s["doc_id"])
    # The same completions as the sampler's own greedy run: stop at "\n", at most 6 new tokens
    want = sample_completions(model, tok, [s["prompt"] for s in samples], max_new_tokens=6, stop=["\n"],
                              chat=False, batch_size=8)
    assert [s["completion"] for s in samples] == [w[0].text for w in want]
    assert [s["extracted"] for s in samples] == [w[0].text for w in want]  # no filter: as generated
    assert all(len(w[0].token_ids) <= 6 for w in want)


def test_registered_as_jaxft_for_lm_evals_own_entry_point(tiny, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = tiny
    save_hf(model, tmp_path / "model", tokenizer=tok)
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(model="jaxft", model_args=f"pretrained={tmp_path / 'model'},batch_size=8",
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
                                  limit=2)
    assert out["n-samples"]["tiny_mc"]["effective"] == 2
    assert math.isfinite(out["results"]["tiny_mc"]["acc,none"])


def test_unknown_task_and_samples_are_config_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ConfigError, match="no lm-eval task no_such_task"):
        get_benchmark("lm_eval:no_such_task").run(model, tok, EvalSettings(data=str(tmp_path)))
    with pytest.raises(ConfigError, match="--samples"):
        get_benchmark("lm_eval:tiny_mc").run(model, tok, EvalSettings(samples=4))
    with pytest.raises(ConfigError, match="at least one task"):
        get_benchmark("lm_eval:")


def test_jaxft_eval_checks_the_tasks_before_the_weights_load(tmp_path, monkeypatch):
    """`jaxft eval --benchmark lm_eval:...` refuses what the run would refuse before loading the
    model: here the folder holds no model at all, and the loader must never be reached."""
    import jaxft.eval.folder as folder

    monkeypatch.setattr(folder, "load_folder", lambda *a, **k: pytest.fail("loaded the weights first"))
    with pytest.raises(ConfigError, match="--samples 4: lm_eval tasks set their own repeats"):
        folder.evaluate_benchmark(str(tmp_path), "lm_eval:tiny_mc", EvalSettings(samples=4))
