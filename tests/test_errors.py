"""Honest errors (jaxft.errors): a user error (a config key or flag, a data file or record, a path)
is one line naming what to fix; anything else (a shape bug, an XLA or storage error, a ValueError
jaxft did not mean to raise) keeps its traceback and is not called a user error."""

import ast
from pathlib import Path

import pytest

from jaxft import cli
from jaxft.errors import ConfigError, DataError, PathError, UserError
from tests.test_cli_errors import no_traceback_env, one_error_line  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


def _user_error_cases(tmp):
    """(argv, the UserError class, what the one line says): each fails before any model loads."""
    (tmp / "eval.jsonl").write_text('{"prompt": "1 + 1 ="}\n')  # no answer
    missing, file = tmp / "missing.jsonl", tmp / "file.txt"
    file.write_text("x")
    sft = ["sft", "--config", f"{REPO / 'configs' / 'sft.py'}:tiny"]
    return [
        (["eval", "--model", str(tmp / "no_model"), "--data", str(missing)], PathError,
         [f"--data {missing}: the file does not exist"]),
        (["eval", "--model", str(tmp / "no_model"), "--data", str(tmp / "eval.jsonl")], DataError,
         [f"{tmp / 'eval.jsonl'} line 1: needs an 'answer' field"]),
        ([*sft, "--workdir", str(tmp / "w"), "--config.train.report_to=bogus"], ConfigError,
         ["config key train.report_to: unknown tracker 'bogus'"]),
        # Paths to write that Python would refuse deep inside the write: named where jaxft takes them.
        ([*sft, "--workdir", str(file / "w")], ConfigError, [f"workdir {file / 'w'} is under {file}, which is a file"]),
        (["export", str(tmp / "run"), "--out", str(file / "o")], PathError, [f"--out {file / 'o'}: {file} is a file"]),
        (["plot", str(tmp / "run"), "--out", str(tmp / "no" / "x.png")], PathError,
         [f"--out {tmp / 'no' / 'x.png'}: the folder {tmp / 'no'} does not exist"]),
        (["compare", str(tmp / "run"), "--out", str(file)], PathError, [f"--out {file} is a file; give a folder"]),
    ]


def test_a_user_error_is_one_line_naming_what_to_fix(tmp_path, capsys, monkeypatch):
    for argv, kind, says in _user_error_cases(tmp_path):
        line = one_error_line(argv, capsys)
        assert line.startswith(f"jaxft {argv[0]}: error: ") and "unexpected" not in line, line
        for text in says:
            assert text in line, (text, line)
        monkeypatch.setenv("JAXFT_TRACEBACK", "1")  # the same error, raised as itself: its class
        with pytest.raises(kind):
            cli.main(argv)
        monkeypatch.delenv("JAXFT_TRACEBACK")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("error,user", [
    (ValueError("operands could not be broadcast together with shapes (8,64) (8,63)"), False),  # a shape bug
    (TypeError("'NoneType' object is not subscriptable"), False),
    (OSError(5, "Input/output error"), False),  # an outside failure: the disk, not a path the user gave
    (DataError("metrics.jsonl line 3: not JSON"), True),  # the same place raising a user error: one line
])
def test_only_a_user_error_loses_its_traceback(error, user, tmp_path, capsys, monkeypatch):
    import jaxft.io.metrics

    def broken(workdir):  # deep inside `jaxft plot`, as a bug would be
        raise error

    monkeypatch.setattr(jaxft.io.metrics, "read_metrics", broken)
    argv = ["plot", str(tmp_path)]
    if user:
        assert one_error_line(argv, capsys) == f"jaxft plot: error: {error}"
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err  # where it happened
    assert f"{type(error).__name__}: {error}" in err
    line = str(exit_info.value.code)
    assert line.startswith(f"jaxft plot: error: unexpected {type(error).__name__}: ")
    assert "not a problem with your config, data or paths" in line and "jaxft bug" in line
    monkeypatch.setenv("JAXFT_TRACEBACK", "1")
    with pytest.raises(type(error)):  # as itself, when asked for
        cli.main(argv)


def test_the_data_errors_of_records_are_user_errors():
    from jaxft.data import formats, sources, tokenize
    from jaxft.io.lock import WorkdirLocked

    for cls in (formats.DataError, sources.RecordTooLargeError, sources.UnreadableFileError,
                tokenize.NoChatTemplateError):
        assert issubclass(cls, DataError) and issubclass(cls, ValueError)
    assert issubclass(WorkdirLocked, UserError) and issubclass(WorkdirLocked, RuntimeError)
    assert issubclass(PathError, OSError) and issubclass(ConfigError, ValueError)


# A message that names a config key or a flag is a user error: raised as a builtin, the CLI would
# print it with a traceback and call it a bug. PENDING: sites their owners convert (issue 23);
# the test fails when one of them is gone, so the list only shrinks.
PENDING: set[tuple[str, str]] = set()
BUILTINS = {"ValueError", "OSError", "FileNotFoundError", "RuntimeError", "KeyError", "TypeError"}


def _text(node) -> str | None:
    """The literal text of a message: a string, an f-string ({} for each field), a "+" chain."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _text(node.left)
    return None


def _builtin_raises_naming_keys(root: Path) -> set:
    """(file, message start, line) of each `raise <builtin>(message)` under `root` whose message
    starts with "config key" or a flag ("--")."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args
                    and getattr(node.exc.func, "id", None) in BUILTINS):
                continue
            text = (_text(node.exc.args[0]) or "").lstrip("{} ")
            if text.startswith(("config key", "--")):
                found.add((path.relative_to(root.parent).as_posix(), text[:40], node.lineno))
    return found


def test_no_builtin_error_names_a_config_key_or_a_flag():
    found = _builtin_raises_naming_keys(REPO / "jaxft")
    pending = {(f, t, n) for f, t, n in found if any(f == pf and t.startswith(pt[:40]) for pf, pt in PENDING)}
    assert found - pending == set(), "raise ConfigError (jaxft.errors) for these: they name a config key or flag"
    gone = {(pf, pt) for pf, pt in PENDING if not any(f == pf and t.startswith(pt[:40]) for f, t, _ in pending)}
    assert not gone, f"converted: drop from PENDING {gone}"


def test_the_scan_finds_a_builtin_raise_naming_a_config_key(tmp_path):
    # The check above cannot pass by finding nothing: of these, only the builtin raises count.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "from jaxft.errors import ConfigError\n"
        "def f(k, n):\n"
        "    if n:\n"
        "        raise ValueError(f\"config key {k}: bad\")\n"
        "    if k:\n"
        "        raise RuntimeError('--flag ' + k)\n"
        "    raise ConfigError(f\"config key {k}: bad\")\n")
    assert _builtin_raises_naming_keys(tmp_path / "pkg") == {
        ("pkg/m.py", "config key {}: bad", 4), ("pkg/m.py", "--flag ", 6)}
