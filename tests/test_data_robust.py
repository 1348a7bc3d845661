"""Data that users actually hand over: CSV / Parquet cells holding JSON message lists, records
of tens of megabytes, and check-data on every spec that training takes."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxft import cli
from jaxft.data.formats import DataError
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.tokenize import load_examples


@pytest.fixture(scope="module")
def tok():
    return load_bundled_tokenizer()


U = {"role": "user", "content": "What is 2 + 2?"}
S = {"role": "system", "content": "Be brief."}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}

# Records as JSONL holds them (nested lists); tabular files get each list as its JSON text. One
# format a file: a tabular row has every column.
RECORDS = {
    "sft": [{"messages": [S, U, A4]}, {"messages": [U, A4, U, A5]}],
    "sft_prompt_completion": [{"prompt": [U], "completion": [A4]}],
    "dpo": [{"prompt": [U], "chosen": [A4], "rejected": [A5]},
            {"prompt": [S, U], "chosen": [A5], "rejected": [A4]}],
    "dpo_implicit": [{"chosen": [U, A4], "rejected": [U, A5]}],
}
KIND = {name: name.split("_")[0] for name in RECORDS}


def _cells(record):
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records):
    fields = sorted({k for r in records for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(_cells(r) for r in records)
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([_cells(r) for r in records]), path)
    return path


def _arrays(examples):
    return [[np.asarray(v).tolist() for v in vars(e).values()] for e in examples]


@pytest.mark.parametrize("name", sorted(RECORDS))
@pytest.mark.parametrize("writer", [write_csv, write_parquet], ids=["csv", "parquet"])
def test_tabular_json_message_cells_train_as_jsonl_lists_do(tok, tmp_path, name, writer):
    # SFT refused these cells and DPO trained on their JSON text: both now read the lists.
    records, kind = RECORDS[name], KIND[name]
    want = load_examples(str(write_jsonl(tmp_path / "d.jsonl", records)), tok, kind=kind, max_length=128)
    ext = "csv" if writer is write_csv else "parquet"
    got = load_examples(str(writer(tmp_path / f"d.{ext}", records)), tok, kind=kind, max_length=128)
    assert got.report.format_counts == want.report.format_counts
    assert _arrays(got.examples) == _arrays(want.examples)


def test_only_tabular_cells_that_start_like_a_message_list_are_decoded(tok, tmp_path):
    def formats(path):
        return load_examples(str(path), tok, kind="dpo", max_length=128).report.format_counts

    lists = [{"prompt": [U], "chosen": [A4], "rejected": [A5]}]
    assert formats(write_csv(tmp_path / "lists.csv", lists)) == {"conversational_preference": 1}
    # Text with brackets stays text, and so does any JSONL string: JSONL writes lists as lists.
    brackets = [{"prompt": "[INST] [1, 2] + [3] = [/INST]", "chosen": "[1, 2, 3]", "rejected": "[4]"}]
    assert formats(write_csv(tmp_path / "brackets.csv", brackets)) == {"preference": 1}
    assert formats(write_jsonl(tmp_path / "strings.jsonl", [_cells(r) for r in lists])) == {"preference": 1}


@pytest.mark.parametrize("writer", [write_csv, write_parquet], ids=["csv", "parquet"])
def test_broken_json_cell_names_file_row_and_field(tok, tmp_path, writer):
    ext = "csv" if writer is write_csv else "parquet"
    rows = [{"prompt": json.dumps([U]), "chosen": json.dumps([A4]), "rejected": json.dumps([A5])},
            {"prompt": json.dumps([U]), "chosen": '[{"role": "assistant", "content": "4"', "rejected": json.dumps([A5])}]
    path = writer(tmp_path / f"d.{ext}", rows)
    where = f"{path} line 3" if ext == "csv" else f"{path} row 1"  # the locations sources.py gives
    with pytest.raises(DataError) as err:
        load_examples(str(path), tok, kind="dpo", max_length=128)
    assert str(err.value).startswith(f"{where}: field 'chosen' starts like a JSON list of messages")
    assert err.value.field == "chosen"
    skipped = load_examples(str(path), tok, kind="dpo", max_length=128, skip_invalid=True)
    assert skipped.report.num_skipped == 1 and skipped.report.num_examples == 1


# --- huge records -----------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys
    # A guard for this machine, not the measure: a regression dies here instead of taking ~12 GB.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from jaxft import cli
    from jaxft.config import base_config
    from jaxft.data.from_config import load_tokenizer, train_data

    path = sys.argv[1]
    try:
        cli.main(["check-data", path, "--kind", "dpo"])
    except SystemExit as exit:
        print("exit", exit.code)
    config = base_config()
    config.data.train, config.train.batch_size, config.data.max_length = path, 2, 64
    report = train_data(config, load_tokenizer(config), kind="dpo").reports[path]
    # This process's own peak: VmHWM is its memory's high-water mark since exec. ru_maxrss is not:
    # Linux carries the forking process's peak across exec, and an xdist worker that ran JAX
    # tests before this one is already past 2 GB.
    status = open("/proc/self/status").read().split("VmHWM:")
    peak = int(status[1].split()[0]) if len(status) > 1 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kib": peak,
                      "too_large": report.num_too_large, "first": report.first_too_large,
                      "examples": report.num_examples}))
""")


def test_a_50_mb_record_is_dropped_unread_in_bounded_memory(tmp_path):
    # One 50 MB DPO pair took ~12 GB in the tokenizer (check-data --kind dpo was killed).
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "2+2=", "chosen": "4", "rejected": "5"}) + "\n")
        f.write('{"prompt": "p", "chosen": "' + "ab " * 17_000_000 + '", "rejected": "x"}\n')
        f.write(json.dumps({"prompt": "3+3=", "chosen": "6", "rejected": "7"}) + "\n")
    assert path.stat().st_size > 50_000_000
    env = {**os.environ, "JAXFT_TRACEBACK": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "exit" not in out  # check-data passed: a dropped record is not an invalid one
    assert f"dropped unread over data.max_record_bytes: 1 (the first: {path} line 2;" in out
    assert "records: 3   examples: 2   invalid: 0" in out
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["maxrss_kib"] < 2 * 1024 * 1024
    assert (numbers["too_large"], numbers["first"], numbers["examples"]) == (1, f"{path} line 2", 2)


def test_records_over_the_limit_in_any_source_are_counted_not_invalid(tok, tmp_path):
    small = {"prompt": "2+2=", "completion": "4"}
    big = {"prompt": "2+2=", "completion": "4 " * 600}  # 1,200 bytes of strings
    for writer, ext, where in ((write_jsonl, "jsonl", "line 2"), (write_csv, "csv", "line 3"),
                               (write_parquet, "parquet", "row 1")):
        path = writer(tmp_path / f"d.{ext}", [small, big, small])
        got = load_examples(str(path), tok, kind="sft", max_length=16, max_record_bytes=1000)
        r = got.report
        assert (r.num_records, r.num_examples, r.num_too_large, r.num_skipped) == (3, 2, 1, 0), ext
        assert r.first_too_large == f"{path} {where}"
        assert "1 dropped over data.max_record_bytes" in r.summary()
        unlimited = load_examples(str(path), tok, kind="sft", max_length=16, max_record_bytes=0)
        assert unlimited.report.num_examples == 3 and unlimited.report.num_truncated == 1


def test_jsonl_line_exactly_at_the_limit_is_kept(tok, tmp_path):
    line = json.dumps({"text": "x" * 50})
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n" + line + "y\n")  # the second: one byte over (and not JSON)
    got = load_examples(str(path), tok, kind="sft", max_length=128, max_record_bytes=len(line))
    assert (got.report.num_examples, got.report.num_too_large) == (1, 1)
    assert got.report.first_too_large == f"{path} line 2"


def test_csv_cells_over_128_kib_are_read(tok, tmp_path):
    # csv's own field limit failed the whole file on one long cell.
    path = write_csv(tmp_path / "d.csv", [{"text": "word " * 40_000}])
    got = load_examples(str(path), tok, kind="sft", max_length=32)
    assert got.report.num_truncated == 1


# --- check-data takes what data.train takes -------------------------------------------------

@pytest.fixture
def sources(tmp_path):
    (tmp_path / "math").mkdir()
    for i in (1, 2, 3):
        write_jsonl(tmp_path / "math" / f"p{i}.jsonl", [{"prompt": f"{i}+{i}=", "completion": str(2 * i)}])
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello world"}, {"text": "bye"}])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    return tmp_path


def test_check_data_on_a_weighted_mixture_with_a_glob(sources, capsys):
    spec = f"{sources}/math/*.jsonl=2,{sources}/docs.jsonl=1"
    cli.main(["check-data", spec])
    out = capsys.readouterr().out
    assert f"check-data {sources}/math/*.jsonl (sft, max_length 512)\nrecords: 3   examples: 3" in out
    assert f"check-data {sources}/docs.jsonl (sft, max_length 512)\nrecords: 2   examples: 2" in out
    assert f"mixture data.train={spec} (sft, 2 sources, 5 examples)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(("*.jsonl", "docs.jsonl"))
            and "%" in line]
    # weight, examples, tokens/example, share of tokens, draws per epoch, source
    assert [row[:2] + row[4:] for row in rows] == [
        ["66.7%", "3", "4.5", f"{sources}/math/*.jsonl"], ["33.3%", "2", "6.0", f"{sources}/docs.jsonl"]]
    assert out.rstrip().endswith("mixture OK")
    with pytest.raises(SystemExit, match=r"data.train: source '.*docs.jsonl' in mixture .* has no weight"):
        cli.main(["check-data", f"{sources}/docs.jsonl,{sources}/math/*.jsonl=1"])


def test_check_data_takes_several_specs_as_a_shell_glob_gives_them(sources, capsys):
    cli.main(["check-data", f"{sources}/math/p1.jsonl", f"{sources}/math/p2.jsonl", f"{sources}/docs.jsonl"])
    out = capsys.readouterr().out
    assert out.count("check-data ") == 3 and out.count("\nOK") == 3 and "mixture" not in out
    # Each spec is its own run: with --kind auto each gets the kind of its records.
    cli.main(["check-data", "--kind", "auto", f"{sources}/docs.jsonl", f"{sources}/pairs.jsonl"])
    out = capsys.readouterr().out
    assert f"check-data {sources}/pairs.jsonl (dpo, max_length 512)" in out and out.count("\nOK") == 2


def test_a_mixture_is_checked_with_one_kind(sources, capsys):
    # Training has one kind for all sources: a DPO file in an SFT mixture is an error, not OK.
    with pytest.raises(SystemExit) as exit:
        cli.main(["check-data", "--kind", "auto", f"{sources}/docs.jsonl=1,{sources}/pairs.jsonl=1"])
    out = capsys.readouterr().out
    assert exit.value.code == 1
    assert f"check-data {sources}/pairs.jsonl (sft, max_length 512)" in out
    assert "a 'preference' record cannot be used for sft" in out
    assert out.rstrip().endswith(f"mixture FAILED: {sources}/pairs.jsonl does not check out (above)")


def test_data_max_record_bytes_takes_effect_in_check_data_training_and_streams(tok, tmp_path, capsys):
    # The key was documented but missing from base_config: the locked config refused
    # --config.data.max_record_bytes and `check-data --max-record-bytes` could not work.
    from jaxft import config as config_lib
    from jaxft.data.from_config import load_kwargs
    from jaxft.data.stream_source import ExampleStream

    small = {"prompt": "2+2=", "completion": "4"}
    path = write_jsonl(tmp_path / "d.jsonl", [small, {"prompt": "2+2=", "completion": "4 " * 600}, small])
    assert cli.main(["check-data", str(path), "--max-record-bytes", "1000"]) in (0, None)
    assert f"dropped unread over data.max_record_bytes: 1 (the first: {path} line 2;" in capsys.readouterr().out
    config = config_lib.load("configs/sft.py:tiny", {"data.train": str(path), "data.max_record_bytes": 1000})
    assert load_kwargs(config)["max_record_bytes"] == 1000
    stream = ExampleStream(str(path), tok, kind="sft", max_length=16, window=8, seed=0, max_record_bytes=1000)
    examples, _ = stream.take(2, stop_at_epoch_end=True)
    assert (len(examples), stream.report.num_too_large, stream.report.first_too_large) == (2, 1, f"{path} line 2")
    with pytest.raises(ValueError, match="data.max_record_bytes: must be >= 0"):
        config_lib.validate(config_lib.load("configs/sft.py:tiny", {"data.max_record_bytes": -1}))
