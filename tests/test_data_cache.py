"""Tokenised caches (jaxft.data.cache) and parallel tokenisation (jaxft.data.workers): a
second load reads the cache and tokenises nothing; any change to what decides the tokens
(file, tokenizer, template, max_length, format) builds another; a killed or damaged build is
rebuilt; worker processes give exactly the examples one process gives."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import cache as cache_lib
from jaxft.data import tokenize
from jaxft.data.assets import quickstart_file
from jaxft.data.formats import DataError
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.tokenize import load_examples

ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def tok():
    return load_bundled_tokenizer()


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in quickstart_file("sft_train.jsonl").read_text().splitlines()[:300]))
    return path


def same(a, b) -> bool:
    fields = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask") if hasattr(a.examples[0], "chosen_ids") \
        else ("input_ids", "loss_mask")
    return len(a.examples) == len(b.examples) and all(
        x.index == y.index and all(np.array_equal(getattr(x, f), getattr(y, f)) for f in fields)
        for x, y in zip(a.examples, b.examples))


def no_tokenising(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenised although the cache should have been read")
    monkeypatch.setattr(tokenize, "tokenize_source", refuse)


def caches(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" not in p.name)


@pytest.mark.parametrize("kind, name", [("sft", "sft_train.jsonl"), ("dpo", "pref_train.jsonl")])
def test_the_second_load_reads_the_cache_and_tokenises_nothing(tmp_path, tok, monkeypatch, kind, name):
    built = load_examples(str(quickstart_file(name)), tok, kind=kind, max_length=64, cache_dir=tmp_path / "c")
    plain = load_examples(str(quickstart_file(name)), tok, kind=kind, max_length=64)
    no_tokenising(monkeypatch)
    read = load_examples(str(quickstart_file(name)), tok, kind=kind, max_length=64, cache_dir=tmp_path / "c")
    assert same(read, plain) and same(built, plain)
    assert read.report.summary() == plain.report.summary()
    assert read.report.raw_lengths == plain.report.raw_lengths and read.report.cache == built.report.cache
    assert read.report.seconds == 0.0 and len(caches(tmp_path / "c")) == 1


def edit(path: Path) -> None:
    """One character of the file changed: same size; the modification time kept too."""
    text, stat = path.read_text(), path.stat()
    assert "3" in text
    path.write_text(text.replace("3", "4", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_each_input_that_decides_the_tokens_gets_its_own_cache(tmp_path, tok, source, monkeypatch):
    from transformers import AutoTokenizer

    folder = tmp_path / "c"
    load = lambda **kw: load_examples(str(source), kw.pop("tokenizer", tok), kind="sft", cache_dir=folder,  # noqa: E731
                                      **{"max_length": 64, **kw})
    load()
    seen = set(caches(folder))
    other_tokenizer = AutoTokenizer.from_pretrained(ASSETS / "gpt2_chatml")
    changes = {
        "max_length": lambda: load(max_length=96),
        "format": lambda: load(fmt="conversational"),
        "template": lambda: load(chat_template=tok.chat_template.replace("<|im_start|>", "<|im_start|> ")),
        "tokenizer": lambda: load(tokenizer=other_tokenizer),
        "file contents (same size)": lambda: (edit(source), load()),
    }
    for what, change in changes.items():
        change()
        now = set(caches(folder))
        assert len(now - seen) == 1, what  # a new cache, the old ones left alone
        seen = now
    # Unchanged again: read, not rebuilt.
    no_tokenising(monkeypatch)
    load()
    assert set(caches(folder)) == seen


def test_a_killed_or_damaged_build_is_rebuilt(tmp_path, tok, source):
    folder = tmp_path / "c"
    first = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=folder)
    cache = Path(first.report.cache)
    # A build killed half-way: its temporary folder (of a dead process) is ignored and removed.
    dead = cache.with_name(f"{cache.name}.tmp-{2**22 + 12345}-1")
    dead.mkdir()
    (dead / "input_ids.npy").write_bytes(b"partial")
    # The cache itself damaged: a file cut short.
    ids = cache / "input_ids.npy"
    ids.write_bytes(ids.read_bytes()[:100])
    again = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=folder)
    assert same(again, first) and again.report.seconds > 0  # tokenised again
    assert not dead.exists() and caches(folder) == [cache.name]
    assert same(cache_lib.read(cache), first)  # and the rebuilt cache reads back whole


def test_a_strict_run_fails_on_a_cached_invalid_record_naming_it(tmp_path, tok, source):
    lines = source.read_text().splitlines()
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # no assistant turn
    source.write_text("\n".join(lines) + "\n")
    skipped = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c", skip_invalid=True)
    assert skipped.report.num_skipped == 1 and len(skipped.examples) == len(lines) - 1
    with pytest.raises(DataError, match=rf"{source.name} line 7: field .messages. must end with an assistant turn"):
        load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c")


def test_worker_processes_give_the_examples_one_process_gives(tok, monkeypatch):
    from jaxft.data import workers

    monkeypatch.setattr(workers, "SERIAL_BELOW", 1024)  # 4,000 records then start workers
    path = str(quickstart_file("sft_train.jsonl"))
    one = load_examples(path, tok, kind="sft", max_length=64)
    two = load_examples(path, tok, kind="sft", max_length=64, num_proc=2)
    assert same(one, two) and one.report.summary() == two.report.summary()
    assert one.report.format_counts == two.report.format_counts


def test_a_hub_dataset_is_tokenised_without_a_cache():
    assert cache_lib.fingerprint("someone/some-dataset", None, {}) is None
    name = cache_lib._folder("/c", "data/*.jsonl", "ab").name  # a folder name, not a glob
    assert name.endswith(".jsonl-ab") and "*" not in name


def test_cached_examples_hash_as_the_tokenised_ones_so_resume_does_not_care(tmp_path, tok, source):
    from jaxft.data.iterator_state import data_hash as _data_hash

    plain = load_examples(str(source), tok, kind="sft", max_length=64)
    load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c")
    cached = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c")
    assert type(cached.examples).__name__ == "CachedExamples"  # hashed from its flat arrays
    assert _data_hash([cached.examples]) == _data_hash([plain.examples]) == _data_hash([list(cached.examples)])


def test_an_edit_past_the_first_mib_keeping_size_and_mtime_is_seen_and_its_bad_record_reported(tmp_path, tok):
    """A 1.5 MiB source (whitespace lines pad it cheaply) edited in the middle, size and
    modification time kept (as zip, rsync -t, Bazel or Nix leave them): another fingerprint,
    tokenised again, and the record the edit broke is reported."""
    records = quickstart_file("sft_train.jsonl").read_text().splitlines()[:60]
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(records[:30] + [" " * (1100 << 10)] + records[30:] + [" " * (380 << 10)]) + "\n")
    assert (1 << 20) < source.stat().st_size < (2 << 20)
    settings = {"kind": "sft", "max_length": 64}
    before = cache_lib.fingerprint(str(source), tok, settings)[0]
    first = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c")
    # Record 45 (line 46 of the file) loses its last assistant turn, the byte count unchanged.
    text, stat = source.read_text(), source.stat()
    start = text.index(records[44])
    broken = records[44][::-1].replace('"tnatsissa"', '"resu"     ', 1)[::-1]
    assert broken != records[44] and len(broken) == len(records[44]) and start > (1 << 20)
    source.write_text(text[:start] + broken + text[start + len(broken):])
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size and source.stat().st_mtime_ns == stat.st_mtime_ns
    assert cache_lib.fingerprint(str(source), tok, settings)[0] != before
    with pytest.raises(DataError, match=rf"{source.name} line 46: field .messages. must end with an assistant turn"):
        load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c")
    skipped = load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=tmp_path / "c", skip_invalid=True)
    # Tokenised again (by the strict load, which cached the report that names the record).
    assert skipped.report.cache != first.report.cache and skipped.report.num_skipped == 1
    assert len(skipped.examples) == len(first.examples) - 1
