"""Format detection / validation and reading every kind of source with its coordinates."""

import json

import pytest

from jaxft.data.formats import (ALL_FORMATS, DPO_FORMATS, SFT_FORMATS, DataError, check_kind,
                                detect_format, parse_record)
from jaxft.data.sources import read_records

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
S = {"role": "system", "content": "Be kind."}

EXAMPLES = {
    "text": {"text": "a b c"},
    "prompt_completion": {"prompt": "a", "completion": "b"},
    "conversational": {"messages": [S, U, A]},
    "conversational_prompt_completion": {"prompt": [U], "completion": [A]},
    "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
    "conversational_preference": {"prompt": [U], "chosen": [A],
                                  "rejected": [{"role": "assistant", "content": "Bye"}]},
    "implicit_preference": {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "Bye"}]},
}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_detects_each_trl_format(fmt):
    record = EXAMPLES[fmt]
    assert detect_format(record, "x") == fmt
    parsed = parse_record({**record, "id": 7, "source": "web"}, "x")  # extra fields ignored
    assert parsed.format == fmt
    assert parse_record(record, "x", fmt) == parsed  # naming the format gives the same
    kind = "sft" if fmt in SFT_FORMATS else "dpo"
    check_kind(fmt, kind, "x")
    with pytest.raises(DataError, match="cannot be used for"):
        check_kind(fmt, "dpo" if kind == "sft" else "sft", "x")


def test_normal_forms():
    assert parse_record(EXAMPLES["conversational"], "x").prompt == []
    assert parse_record(EXAMPLES["conversational"], "x").completion == [S, U, A]
    r = parse_record(EXAMPLES["implicit_preference"], "x")
    assert (r.prompt, r.chosen, r.rejected) == ([U], [A], [{"role": "assistant", "content": "Bye"}])
    # Message keys other than role/content are dropped.
    r = parse_record({"messages": [{**U, "name": "bob"}, A]}, "x")
    assert r.completion == [U, A]


def test_none_fields_count_as_absent():
    # Parquet / datasets rows carry every column; unused ones are None.
    row = {"text": None, "prompt": "a", "completion": "b", "messages": None, "chosen": None,
           "rejected": None}
    assert detect_format(row, "x") == "prompt_completion"


def test_named_format_is_enforced():
    with pytest.raises(DataError, match="x: field 'text' is missing"):
        parse_record(EXAMPLES["prompt_completion"], "x", "text")
    with pytest.raises(ValueError, match="unknown data format 'chat'"):
        parse_record(EXAMPLES["text"], "x", "chat")
    with pytest.raises(ValueError, match="kind must be 'sft' or 'dpo'"):
        check_kind("text", "ppo", "x")
    assert set(SFT_FORMATS) | set(DPO_FORMATS) == set(ALL_FORMATS)


# --- sources ----------------------------------------------------------------------------------

RECORDS = [{"text": f"doc {i}"} for i in range(3)]


def records_of(source, **kw):
    return list(read_records(str(source), **kw))


def test_jsonl_lines_are_numbered_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert records_of(path) == [(f"{path} line 1", RECORDS[0]), (f"{path} line 3", RECORDS[1])]


@pytest.mark.parametrize("body", [RECORDS, {"data": RECORDS}])
def test_json_documents(tmp_path, body):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(body, indent=2))
    assert records_of(path) == [(f"{path} index {i}", r) for i, r in enumerate(RECORDS)]


def test_json_lines_under_a_json_name(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert [loc for loc, _ in records_of(path)] == [f"{path} line {i}" for i in (1, 2, 3)]


def test_byte_order_marks_are_ignored(tmp_path):
    bom = b"\xef\xbb\xbf"
    for name, body in (("t.jsonl", json.dumps(RECORDS[0]) + "\n"), ("t.json", json.dumps(RECORDS[:1])),
                       ("t.csv", "text\ndoc 0\n")):
        (tmp_path / name).write_bytes(bom + body.encode())
        assert [r for _, r in records_of(tmp_path / name)] == [RECORDS[0]], name


def test_csv_rows_name_their_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\na,b\n"multi\nline",c\n', newline="")
    assert records_of(path) == [(f"{path} line 2", {"prompt": "a", "completion": "b"}),
                                (f"{path} line 3", {"prompt": "multi\nline", "completion": "c"})]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    msgs = [[U, A], None, None]
    pq.write_table(pa.Table.from_pylist(
        [{"text": None, "messages": msgs[0]}, {"text": "x", "messages": None},
         {"text": "y", "messages": None}]), path)
    got = records_of(path)
    assert [loc for loc, _ in got] == [f"{path} row {i}" for i in range(3)]
    assert got[0][1]["messages"] == [U, A] and got[1][1]["text"] == "x"
    assert [detect_format(r, loc) for loc, r in got] == ["conversational", "text", "text"]


def test_globs_and_folders_are_read_in_sorted_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for name, rec in (("b.jsonl", RECORDS[1]), ("a.jsonl", RECORDS[0]), ("c.json", [RECORDS[2]])):
        (tmp_path / "d" / name).write_text(json.dumps(rec) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    expect = [("d/a.jsonl line 1", RECORDS[0]), ("d/b.jsonl line 1", RECORDS[1]),
              ("d/c.json index 0", RECORDS[2])]
    assert records_of("d/*.json*") == expect
    assert records_of("d") == expect


def test_save_to_disk_folders(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert records_of(tmp_path / "one") == [(f"{tmp_path / 'one'} index {i}", r)
                                            for i, r in enumerate(RECORDS)]
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert records_of(tmp_path / "dd", split="test") == [(f"{tmp_path / 'dd'}[test] index 0", RECORDS[2])]
    with pytest.raises(DataError, match=r"has no split 'eval'; it has \['test', 'train'\]"):
        records_of(tmp_path / "dd", split="eval")


def test_unsupported_and_empty_sources(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(DataError, match=r"t.txt: unsupported file type '.txt'; use one of .jsonl"):
        records_of(tmp_path / "t.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no data files"):
        records_of(tmp_path / "empty")
    (tmp_path / "n.json").write_text("3")
    with pytest.raises(DataError, match=r"n.json: expected a list of records"):
        records_of(tmp_path / "n.json")
    with pytest.raises(DataError, match=r"\./gone/x: file not found"):
        records_of("./gone/x")
