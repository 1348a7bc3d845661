"""One reader for every text file a user gives jaxft (`jaxft.data.sources`): training (in memory
and streamed), check-data, `eval --data`, `generate --prompts` and compare accept the same files
(UTF-8 with or without a BOM, LF or CRLF, JSONL / JSON / CSV / Parquet, .gz / .zst), refuse the
same ones naming the file, and name the file and line of every parse error."""

import gzip
import json
import re
import sys

import pytest

from jaxft import cli
from jaxft.data.formats import DataError
from jaxft.data.from_config import load_bundled_tokenizer
from jaxft.data.sources import UnreadableFileError, read_json, read_records
from jaxft.data.stream_source import ExampleStream
from jaxft.data.tokenize import load_examples
from jaxft.eval.generation import read_jsonl, read_prompts
from jaxft.models.peft import read_adapter_config
from tests.test_cli_errors import no_traceback_env, one_error_line  # noqa: F401 (a fixture)

RECORDS = [{"prompt": "1 + 1 =", "completion": " 2", "answer": "2"},
           {"prompt": "héllo ✓ =", "completion": " wörld", "answer": "w"}]
JSONL_BOM_CRLF = ("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in RECORDS)).encode()
CSV_BOM_CRLF = ("\ufeffprompt,completion,answer\r\n"
                + "".join(f"{r['prompt']},{r['completion']},{r['answer']}\r\n" for r in RECORDS)).encode()


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(RECORDS), path)


# name -> writer of that file in `folder`
VARIANTS = {
    "plain.jsonl": lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS)),
    "bom_crlf.jsonl": lambda p: p.write_bytes(JSONL_BOM_CRLF),
    "bom_crlf.jsonl.gz": lambda p: p.write_bytes(gzip.compress(JSONL_BOM_CRLF)),
    "bom_crlf.jsonl.zst": lambda p: p.write_bytes(_zstd(JSONL_BOM_CRLF)),
    "bom_crlf.json": lambda p: p.write_bytes(("\ufeff" + json.dumps(RECORDS, indent=2, ensure_ascii=False)
                                              ).replace("\n", "\r\n").encode()),
    "list.json.gz": lambda p: p.write_bytes(gzip.compress(json.dumps(RECORDS).encode())),
    "bom_crlf.csv": lambda p: p.write_bytes(CSV_BOM_CRLF),
    "bom_crlf.csv.gz": lambda p: p.write_bytes(gzip.compress(CSV_BOM_CRLF)),
    "rows.parquet": _parquet,
}


@pytest.fixture(scope="module")
def tok():
    return load_bundled_tokenizer()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_reader_accepts_the_same_file(name, tok, tmp_path, capsys):
    path = tmp_path / name
    VARIANTS[name](path)
    assert [r for _, r in read_records(str(path))] == RECORDS  # the reader training and check-data use
    assert read_jsonl(path) == RECORDS  # jaxft eval --data
    assert read_prompts(path) == [r["prompt"] for r in RECORDS]  # jaxft generate --prompts
    assert len(load_examples(str(path), tok, kind="sft", max_length=64).examples) == 2  # training, in memory
    stream = ExampleStream(str(path), tok, kind="sft", max_length=64, window=4, seed=0)
    assert len(stream.take(2, stop_at_epoch_end=True)[0]) == 2  # training, streamed
    # The CLI commands read the file, then stop at the (missing) model: the file was accepted.
    nowhere = str(tmp_path / "no_model")
    for argv in (["eval", "--model", nowhere, "--data", str(path)],
                 ["generate", "--model", nowhere, "--prompts", str(path)]):
        assert "no_model: the folder does not exist" in one_error_line(argv, capsys)


def test_a_broken_line_is_named_by_every_command(tok, tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "1", "answer": "1"}\r\n'
                     b'{"prompt": "b" "answer": "2"}\r\n')
    said = f"{path} line 2: invalid JSON: Expecting ',' delimiter (column 16)"
    nowhere = str(tmp_path / "no_model")
    for argv in (["eval", "--model", nowhere, "--data", str(path)],
                 ["generate", "--model", nowhere, "--prompts", str(path)]):
        assert one_error_line(argv, capsys).endswith(said)  # found before the model is looked for
    with pytest.raises(DataError, match="^" + re.escape(said)):
        load_examples(str(path), tok, kind="sft", max_length=64)
    with pytest.raises(SystemExit):
        cli.main(["check-data", str(path)])
    assert said in capsys.readouterr().out


def _gzip_named_jsonl(p):
    p.write_bytes(gzip.compress(JSONL_BOM_CRLF))


def _truncated_gzip(p):
    body = "".join(json.dumps({**RECORDS[0], "i": i}) + "\n" for i in range(3000)).encode()
    p.write_bytes(gzip.compress(body)[:4000])


# file name, writer, what the error after "PATH: " says
UNREADABLE = [
    ("gzipped.jsonl", _gzip_named_jsonl, "is gzip-compressed but its name does not end in .gz: rename it "
                                         "to gzipped.jsonl.gz"),
    ("plain.jsonl.gz", lambda p: p.write_bytes(JSONL_BOM_CRLF), "ends in .gz but is not gzip-compressed: "
                                                               "rename it to plain.jsonl"),
    ("weights.jsonl", lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "is a binary file, not text (a NUL byte at byte 1)"),
    ("utf16.jsonl", lambda p: p.write_bytes(JSONL_BOM_CRLF.decode("utf-8-sig").encode("utf-16")),
     "is UTF-16 text; jaxft reads UTF-8"),
    ("table.csv", lambda p: _parquet(p), "is a Parquet file: give it the .parquet extension"),
]


@pytest.mark.parametrize("name,write,says", [pytest.param(*c, id=c[0]) for c in UNREADABLE])
def test_a_file_that_is_not_what_its_name_says_is_refused_naming_it(name, write, says, tok, tmp_path, capsys):
    path = tmp_path / name
    write(path)
    for read in (read_jsonl, lambda p: load_examples(str(p), tok, kind="sft", max_length=64)):
        with pytest.raises(UnreadableFileError) as err:
            read(path)
        assert str(err.value).startswith(f"{path}: {says}"), str(err.value)
    line = one_error_line(["eval", "--model", str(tmp_path / "no_model"), "--data", str(path)], capsys)
    assert f"{path}: {says}" in line
    # data.skip_invalid skips the file as it skips a bad record (a mixture's other sources go on)
    with pytest.raises(DataError, match=f"no usable examples .*first error: {re.escape(str(path))}: "):
        load_examples(str(path), tok, kind="sft", max_length=64, skip_invalid=True)


def test_a_truncated_gzip_is_named_and_skip_invalid_keeps_the_records_before_the_cut(tok, tmp_path, capsys):
    path = tmp_path / "cut.jsonl.gz"
    _truncated_gzip(path)
    says = f"{path}: the gzip data is damaged or truncated after {path} line "
    with pytest.raises(UnreadableFileError, match="^" + re.escape(says)):
        load_examples(str(path), tok, kind="sft", max_length=64)
    assert says in one_error_line(["eval", "--model", str(tmp_path / "no_model"), "--data", str(path)], capsys)
    loaded = load_examples(str(path), tok, kind="sft", max_length=64, skip_invalid=True)
    assert loaded.report.num_skipped == 1 and len(loaded.examples) > 100
    assert loaded.report.errors[0][0] == str(path)
    assert loaded.report.errors[0][1].startswith(f"the gzip data is damaged or truncated after {path} line "
                                                 f"{len(loaded.examples)} (EOFError")


def test_zeros_after_good_lines_are_bad_lines_not_a_binary_file(tok, tmp_path):
    # A crash can leave a block of NUL bytes at a file's end: the lines before it still count.
    path = tmp_path / "tail.jsonl"
    path.write_bytes(JSONL_BOM_CRLF + b"\x00" * 64 + b"\n")
    loaded = load_examples(str(path), tok, kind="sft", max_length=64, skip_invalid=True)
    assert len(loaded.examples) == 2 and loaded.report.errors[0][0] == f"{path} line 3"


def test_zstd_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` raises ImportError
    with pytest.raises(DataError, match=r"d.jsonl.zst: is zstd-compressed \(.zst\) and reading it needs the "
                                        r"zstandard package: pip install zstandard"):
        read_jsonl(path)


def test_a_compressed_parquet_and_an_unknown_suffix_are_refused(tmp_path):
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(DataError, match=r"t.parquet.gz: a gzip-compressed Parquet file cannot be read"):
        read_jsonl(tmp_path / "t.parquet.gz")
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataError, match=r"t.txt.gz: unsupported file type '.txt.gz'"):
        read_jsonl(tmp_path / "t.txt.gz")


def test_a_folder_reads_its_compressed_files_too(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(gzip.compress(JSONL_BOM_CRLF))
    (tmp_path / "d" / "b.csv").write_bytes(CSV_BOM_CRLF)
    (tmp_path / "d" / "notes.txt.gz").write_bytes(gzip.compress(b"not data"))
    assert read_jsonl(tmp_path / "d") == RECORDS + RECORDS


def test_single_json_files_name_file_and_line(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{\n  "r": 8,\n  "lora_alpha": 16\n  "peft_type": "LORA"\n}\n')
    with pytest.raises(DataError, match=rf"^lora.init_from {path} line 4: invalid JSON: Expecting ',' delimiter"):
        read_adapter_config(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf{\r\n\"r\": 8, \"peft_type\": \"LORA\"\r\n}")  # BOM + CRLF: fine
    assert read_adapter_config(tmp_path)["r"] == 8
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"adapter_config.json: expected a JSON object \(\{...\}\), got a JSON list"):
        read_adapter_config(tmp_path)
    path.write_text("")
    with pytest.raises(DataError, match=r"adapter_config.json: the file is empty"):
        read_json(path)
    path.write_text('{"a": 1}\n{"a": 2}\n')  # two documents: a torn or concatenated file
    with pytest.raises(DataError, match=r"adapter_config.json line 2: invalid JSON: Extra data"):
        read_json(path)


@pytest.mark.parametrize("damaged", ["config.json", "sweep_run.json", "sweep.json"])
def test_compare_names_the_damaged_file(damaged, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        (sweep / name / "config.json").write_text(json.dumps({"optim": {"lr": 1.0 if name == "a" else 2.0}}))
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": "a"}, {"name": "b"}]}))
    if damaged == "sweep_run.json":
        for name in ("a", "b"):
            (sweep / name / damaged).write_text('{"settings": {"overrides": {}}, "status": "finished"}')
    broken = sweep / damaged if damaged == "sweep.json" else sweep / "b" / damaged
    broken.write_text('{"runs": [\n{"name": "a"},\n{"name": "b"\n')  # cut off by a kill
    line = one_error_line(["compare", str(sweep)], capsys)
    assert f"{broken} line 4: invalid JSON: Expecting" in line, line
