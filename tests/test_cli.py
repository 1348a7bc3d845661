"""The `jaxft` command: help, check-data's exit status, clean errors, bench."""

import json

import pytest

from jaxft import cli


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in out


def test_unknown_command_fails():
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        cli.main(["trian"])


def test_check_data_ok_and_failing(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) for i in range(20)))
    cli.main(["check-data", str(good), "--kind", "sft", "--max-length", "64"])
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '\n{"prompt": "x", "completion": ""}\n{not json\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-data", str(bad), "--kind", "sft", "--max-length", "64"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "bad.jsonl line 21" in out and "bad.jsonl line 22" in out


def test_library_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"jaxft export: error: .*config.json not found"):
        cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])


