"""`check_data` numbers on small hand-computed files, and `ok` / FAILED on errors."""

import json
import logging
import re
from pathlib import Path

import pytest

from jaxft.data.check import check_data, format_check_result
from jaxft.data.from_config import load_bundled_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_bundled_tokenizer()


def write(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# Bundled tokenizer lengths: <s> 2 + 2 = 4 </s> is 7 tokens, <s> H i Ġthere . </s> is 6.
SFT = [
    {"prompt": "2+2=", "completion": "4"},                        # 7 tokens
    {"text": "Hi there."},                                        # 6
    '{"prompt": "a"}',                                            # invalid: no completion
    {"prompt": "1+1+1+1+1+1+1+1+1=", "completion": "9"},          # 21: prompt 19 > 16, dropped
    {"prompt": "2+2=", "completion": "4 4 4 4 4 4 4 4 4"},        # 23: truncated to 16
]


def test_sft_numbers(tok, tmp_path):
    path = write(tmp_path, SFT)
    result = check_data(str(path), tok, kind="sft", max_length=16, batch_size=3)
    r = result.report
    assert not result.ok
    assert (r.num_records, r.num_examples, r.num_skipped, r.num_truncated,
            r.num_dropped_too_long, r.num_prompt_too_long) == (5, 3, 1, 1, 1, 1)
    assert r.format_counts == {"prompt_completion": 3, "text": 1}
    assert r.raw_lengths == [7, 6, 21, 23] and r.lengths == [7, 6, 16]
    assert result.length_stats == {"p50": 7, "p90": 21, "p99": 21, "max": 23}
    real = 7 + 6 + 16
    assert result.padding == pytest.approx({
        "padded": 1 - real / (3 * 16),
        "bucketed": 1 - real / (3 * 16),  # one batch of 3 in the only bucket, 16
        "packed": 1 - real / (2 * 16),    # rows [16] and [7 + 6]
    })
    assert r.errors == [(f"{path} line 3", "field 'completion' is missing")]
    text = format_check_result(result)
    assert "records: 5   examples: 3   invalid: 1   truncated: 1   dropped as too long: 1" in text
    assert "formats: prompt_completion 3, text 1" in text
    assert "p50 7  p90 21  p99 21  max 23  (2 over 16)" in text
    assert "padding with packing: 9.4%" in text
    assert f"  {path} line 3: field 'completion' is missing" in text
    assert text.endswith("FAILED: 1 invalid records (fix them, or train with "
                         "data.skip_invalid=True to skip them)")


def test_clean_file_is_ok(tok, tmp_path):
    result = check_data(str(write(tmp_path, SFT[:2])), tok, kind="sft", max_length=16)
    assert result.ok and format_check_result(result).endswith("\nOK")


def test_dpo_packing_cuts_each_side_to_half(tok, tmp_path):
    pairs = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"},            # 7 + 7
             {"prompt": "3+3=", "chosen": "6", "rejected": "7"},            # 7 + 7
             {"prompt": "1+2+3+4+5=", "chosen": "15", "rejected": "16"}]    # prompt 11 > 8
    result = check_data(str(write(tmp_path, pairs)), tok, kind="dpo", max_length=16, batch_size=3)
    assert result.ok and result.report.lengths == [7, 7, 14]
    assert result.packed_dpo_dropped == 1
    assert result.padding["padded"] == pytest.approx(1 - 56 / (6 * 16))
    assert result.padding["packed"] == pytest.approx(1 - 28 / (2 * 16))  # one pair a row
    assert "(each side cut to 8; 1 more pairs dropped)" in format_check_result(result)
    # kind="auto" looks at the first recognisable record.
    path = write(tmp_path, ["not json", {"x": 1}] + pairs, name="p.jsonl")
    assert check_data(str(path), tok, kind="auto", max_length=16).kind == "dpo"
    assert check_data(str(write(tmp_path, SFT)), tok, kind="auto", max_length=16).kind == "sft"


def test_fatal_errors_fail(tok, tmp_path):
    result = check_data(str(tmp_path / "nope.jsonl"), tok, kind="sft", max_length=16)
    assert not result.ok and result.fatal == f"{tmp_path / 'nope.jsonl'}: file not found"
    assert format_check_result(result).endswith(f"error: {result.fatal}\nFAILED")
    # Wrong data for the command: every record is skipped, nothing usable.
    path = write(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    result = check_data(str(path), tok, kind="sft", max_length=16)
    assert not result.ok and result.report.num_examples == 0
    assert "a 'preference' record cannot be used for sft" in format_check_result(result)
    # skip_invalid=False stops at the first bad record.
    result = check_data(str(write(tmp_path, SFT)), tok, kind="sft", max_length=16,
                        skip_invalid=False)
    assert not result.ok and "line 3: field 'completion' is missing" in result.fatal


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENS_LOGGED = re.compile(r"(\d+) tokens \((\d+) trained\)")
TOKENS_PRINTED = re.compile(r"tokens: (\d+) \((\d+) trained\)")


def _head(src, n, path):
    path.write_text("".join(Path(src).read_text().splitlines(keepends=True)[:n]))
    return str(path)


def test_check_data_config_reports_the_token_counts_the_run_logs(tmp_path, caplog, capsys):
    from jaxft import cli
    from jaxft.config import load
    from jaxft.data.assets import quickstart_file
    from jaxft.run import run

    # 64-token rows truncate some of these conversations: both sides must agree on that too.
    overrides = {"data.train": _head(quickstart_file("sft_train.jsonl"), 96, tmp_path / "train.jsonl"),
                 "data.eval": "", "data.max_length": 64, "train.steps": 1, "train.batch_size": 8,
                 "optim.warmup_steps": 0, "train.progress": False}
    with caplog.at_level(logging.INFO, logger="jaxft.data"):
        run(load(f"{CONFIGS / 'sft.py'}:tiny", overrides), tmp_path / "run", export=False)
    logged = TOKENS_LOGGED.search(caplog.text)
    cli.main(["check-data", f"--config={CONFIGS / 'sft.py'}:tiny"]
             + [f"--config.{k}={v}" for k, v in overrides.items()])
    printed = TOKENS_PRINTED.search(capsys.readouterr().out)
    assert logged and printed and logged.groups() == printed.groups()


def test_check_data_config_loads_packed_pairs_as_training_does(tmp_path, capsys):
    from jaxft import cli
    from jaxft.config import load
    from jaxft.data.assets import quickstart_file
    from jaxft.data.from_config import load_tokenizer, train_data

    # Packed DPO: each sequence is cut to max_length // 2 so that a pair fits one row.
    overrides = {"data.train": _head(quickstart_file("pref_train.jsonl"), 64, tmp_path / "pairs.jsonl"),
                 "data.eval": "", "data.max_length": 96, "data.packing": True}
    config = load(f"{CONFIGS / 'dpo.py'}:tiny", overrides)
    report = next(iter(train_data(config, load_tokenizer(config), kind="dpo").reports.values()))
    assert report.num_truncated > 0
    cli.main(["check-data", f"--config={CONFIGS / 'dpo.py'}:tiny"]
             + [f"--config.{k}={v}" for k, v in overrides.items()])
    out = capsys.readouterr().out
    assert "(dpo, max_length 96, packed: each sequence cut to 48)" in out
    assert TOKENS_PRINTED.search(out).groups() == (str(report.num_tokens), str(report.num_trained_tokens))
    assert f"truncated: {report.num_truncated}" in out
