"""Nothing a user types loses work or shows a traceback: `jaxft export` never writes into a
run's workdir (the run still resumes), generate / eval given a workdir use its export, and every
bad input to a command is one error line naming the file, line, flag or config key to fix."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxft import cli, config as config_lib, run as run_lib
from jaxft.io import folders
from jaxft.io.metrics import read_metrics
from tests.quickstart_subset import sft_data

REPO = Path(__file__).resolve().parents[1]
SFT_TINY = f"{REPO / 'configs' / 'sft.py'}:tiny"
TINY_RUN = {"train.steps": 1, "train.batch_size": 8, "data.max_length": 64, "train.progress": False,
            "train.log_every": 1, "train.save_every": 1, "optim.warmup_steps": 0, "data.eval": "",
            "train.report_to": "none"}


def one_error_line(argv, capsys) -> str:
    """Runs `jaxft ARGV` in process; asserts it fails with exactly one error line and no
    traceback (argparse's usage lines and the JAXFT_TRACEBACK hint aside); returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)  # any other exception fails the test: it would be a traceback
    code = exit_info.value.code
    assert code not in (0, None)
    text = (code if isinstance(code, str) else "") + "\n" + capsys.readouterr().err
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(
        ("(set JAXFT_TRACEBACK", "usage:", " ")) and " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(autouse=True)
def no_traceback_env(monkeypatch):
    monkeypatch.delenv("JAXFT_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 1-step tiny SFT run (checkpoint at step 1, export in WORKDIR/hf) and its data."""
    folder = tmp_path_factory.mktemp("run")
    data = sft_data(folder, 64)
    config = config_lib.load(SFT_TINY, {**TINY_RUN, "data.train": data["data.train"]})
    result = run_lib.run(config, folder / "run")
    return {"workdir": result.workdir, "data": data["data.train"], "eval": data["data.eval"]}


# --- 1. Export and generate never damage a run ------------------------------------------------


def test_export_into_the_workdir_is_refused_and_the_run_still_resumes(tiny_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run["workdir"], workdir)
    saved = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    for out in (workdir, workdir / "hf", workdir / "checkpoints" / "x", workdir / "new"):
        line = one_error_line(["export", str(workdir), "--out", str(out)], capsys)
        assert f"--out {out}" in line and "never writes into a run's folder" in line
        assert str(workdir) in line
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == saved  # not a byte changed
    assert not (workdir / "new").exists()

    config = config_lib.load(SFT_TINY, {**TINY_RUN, "data.train": tiny_run["data"], "train.steps": 2})
    resumed = run_lib.run(config, workdir)
    assert resumed.step == 2
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2]  # step 1 was not redone


def test_export_writes_new_or_its_own_folders_only(tiny_run, tmp_path, capsys):
    workdir = tiny_run["workdir"]
    out = tmp_path / "export"
    cli.main(["export", str(workdir), "--out", str(out)])
    assert folders.export_marker(out)["layout"] == "hf" and folders.is_model_folder(out)
    cli.main(["export", str(workdir), "--out", str(out)])  # a re-export replaces its own files
    assert folders.is_model_folder(out)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    line = one_error_line(["export", str(workdir), "--out", str(other)], capsys)
    assert "is not empty and is not a folder jaxft exported" in line
    assert [p.name for p in other.iterdir()] == ["todo.txt"] and (other / "todo.txt").read_text() == "mine"


def test_generate_and_eval_given_a_workdir_use_its_export(tiny_run, tmp_path, capsys):
    workdir = tiny_run["workdir"]
    assert folders.model_folder(workdir) == workdir / "hf"
    cli.main(["generate", "--model", str(workdir), "--prompt", "1 + 1 =", "--max-new-tokens", "2"])
    assert ">>> 1 + 1 =" in capsys.readouterr().out

    unexported = tmp_path / "unexported"  # a run stopped before its final export
    shutil.copytree(workdir, unexported, ignore=shutil.ignore_patterns("hf"))
    for command in (["generate", "--prompt", "hi"], ["eval", "--data", tiny_run["eval"]]):
        line = one_error_line([command[0], "--model", str(unexported), *command[1:]], capsys)
        assert "without an export yet" in line and f"jaxft export {unexported} --out DIR" in line


# --- 2. Every CLI error is one line -----------------------------------------------------------


def _corrupt_copy(model: Path, dest: Path, name: str, content: bytes | None) -> Path:
    shutil.copytree(model, dest)
    if content is None:
        (dest / name).unlink()
    else:
        (dest / name).write_bytes(content)
    return dest


@pytest.fixture(scope="module")
def bad(tiny_run, tmp_path_factory) -> dict:
    """Paths of broken inputs, by name."""
    d = tmp_path_factory.mktemp("bad")
    model = tiny_run["workdir"] / "hf"
    weights = (model / "model.safetensors").read_bytes()
    (d / "empty_folder").mkdir()
    (d / "typo_config.py").write_text("def get_config():\n    return cofnig\n")
    (d / "prompts.jsonl").write_text('{"prompt": "1 + 1 ="}\n\n{"prompt": "  "}\n')
    (d / "eval.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\n'
                                  '{"messages": [{"role": "user", "content": ""}], "answer": "3"}\n')
    return {
        "workdir": tiny_run["workdir"], "model": model, "data": tiny_run["data"], "dir": d,
        "truncated": _corrupt_copy(model, d / "truncated", "model.safetensors", weights[:len(weights) // 2]),
        "garbage": _corrupt_copy(model, d / "garbage", "model.safetensors", b"<html>503 Service Unavailable</html>"),
        "bad_json": _corrupt_copy(model, d / "bad_json", "config.json", b'{"model_type": "lla'),
        "no_tokenizer": _corrupt_copy(model, d / "no_tokenizer", "tokenizer.json", b"{"),
    }


def _train(b, *overrides):
    return ["sft", "--config", SFT_TINY, "--workdir", str(b["tmp"] / "w"), "--config.train.report_to=none",
            *overrides]


# (case, argv from the bad paths, what the one line must say)
CASES = [
    ("config key typo", lambda b: _train(b, "--config.optim.lrr=1"),
     ['--config.optim.lrr=1', 'Did you mean "lr"']),
    ("config file missing", lambda b: ["sft", "--config", str(b["dir"] / "nope.py"), "--workdir", "w"],
     ["nope.py not found"]),
    ("config file raises", lambda b: ["plan", "--config", str(b["dir"] / "typo_config.py"), "--target", "v5p-8"],
     ["typo_config.py", "line 2", "NameError", "cofnig"]),
    ("sweep config file raises", lambda b: ["sweep", "--config", str(b["dir"] / "typo_config.py"), "--kind", "sft",
                                            "--sweep", "train.steps=1,2", "--workdir", str(b["tmp"] / "sweep")],
     ["jaxft sweep: --config", "typo_config.py: line 2: NameError"]),
    ("unknown preset", lambda b: _train(b)[:2] + [SFT_TINY.replace(":tiny", ":tiniest")] + _train(b)[3:],
     ["unknown preset 'tiniest'", "choose one of tiny"]),
    ("model.path missing", lambda b: _train(b, f"--config.model.path={b['dir'] / 'nowhere'}"),
     ["model.path", "nowhere: the folder does not exist"]),
    ("model.path without config.json", lambda b: _train(b, f"--config.model.path={b['dir'] / 'empty_folder'}"),
     ["model.path", "empty_folder has no config.json"]),
    ("model.path is a workdir", lambda b: _train(b, f"--config.model.path={b['workdir']}"),
     ["model.path", "is a run's workdir, not a model folder", "/hf (its export)"]),
    ("truncated safetensors", lambda b: ["generate", "--model", str(b["truncated"]), "--prompt", "hi"],
     ["truncated/model.safetensors is not a readable safetensors file"]),
    ("empty prompt in eval data", lambda b: ["eval", "--model", str(b["garbage"]), "--data", str(b["dir"] / "eval.jsonl")],
     # found before the (damaged) model loads: the inputs are checked first
     ["eval.jsonl line 2: the prompt is empty"]),
    ("garbage safetensors", lambda b: ["generate", "--model", str(b["garbage"]), "--prompt", "x"],
     ["garbage/model.safetensors is not a readable safetensors file"]),
    ("damaged config.json", lambda b: ["generate", "--model", str(b["bad_json"]), "--prompt", "x"],
     ["bad_json/config.json: not a JSON object"]),
    ("damaged tokenizer", lambda b: ["generate", "--model", str(b["no_tokenizer"]), "--prompt", "x"],
     ["--model", "no_tokenizer: cannot load its tokenizer"]),
    ("mixture weight not a number", lambda b: _train(b, f"--config.data.train={b['data']}=abc,{b['data']}=1"),
     ["data.train", "weight 'abc'", "is not a number"]),
    ("mixture weight not positive", lambda b: _train(b, f"--config.data.train={b['data']}=-1,{b['data']}=1"),
     ["data.train", "must be a finite number > 0, got -1"]),
    ("empty prompt in a prompts file", lambda b: ["generate", "--model", str(b["model"]),
                                                  "--prompts", str(b["dir"] / "prompts.jsonl")],
     ["prompts.jsonl line 3: the prompt is empty"]),
    ("empty --prompt", lambda b: ["generate", "--model", str(b["model"]), "--prompt", ""],
     ["--prompt number 1 is empty"]),
    ("export of an exported folder", lambda b: ["export", str(b["model"]), "--out", str(b["dir"] / "o")],
     ["hf is already an exported model folder; export reads a run's workdir (", "/run)"]),
    ("export of a non-workdir", lambda b: ["export", str(b["dir"] / "empty_folder"), "--out", str(b["dir"] / "o")],
     ["empty_folder/config.json not found", "export reads a run's workdir"]),
    ("export of a missing step", lambda b: ["export", str(b["workdir"]), "--step", "7", "--out", str(b["dir"] / "o")],
     ["--step 7 is not a saved step", "saved steps: [1]"]),
    ("eval of a missing folder", lambda b: ["eval", "--model", str(b["dir"] / "nowhere"), "--pairs", b["data"]],
     ["--model", "nowhere: the folder does not exist"]),
    ("eval --limit 0", lambda b: ["eval", "--model", str(b["model"]), "--data", b["data"], "--limit", "0"],
     ["--limit", "'0' is not a whole number >= 1"]),
]


@pytest.mark.parametrize("argv,says", [pytest.param(a, s, id=name) for name, a, s in CASES])
def test_every_cli_error_is_one_line_naming_what_to_fix(bad, argv, says, tmp_path, capsys):
    line = one_error_line(argv({**bad, "tmp": tmp_path}), capsys)
    for text in says:
        assert text in line, (text, line)


def test_the_command_prints_one_line_on_stderr(tmp_path):
    # The real entry point: the message reaches stderr as is, exit status 1, no traceback.
    out = subprocess.run([sys.executable, "-m", "jaxft.cli", "sft", "--config", str(tmp_path / "nope.py"),
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"jaxft sft: --config {tmp_path / 'nope.py'}: config file "
                                               f"{tmp_path / 'nope.py'} not found"]
    assert not (tmp_path / "w").exists()


def test_a_workdir_and_an_export_are_told_apart(tiny_run):
    workdir = tiny_run["workdir"]
    assert folders.is_workdir(workdir) and not folders.is_model_folder(workdir)
    assert folders.is_model_folder(workdir / "hf") and not folders.is_workdir(workdir / "hf")
    assert folders.enclosing_workdir(workdir / "hf" / "deeper") == workdir
    assert json.loads((workdir / "hf" / folders.EXPORT_MARKER).read_text())["layout"] == "hf"


# --- 3. A config or sweep file that fails: the same line from every command ---------------------

_HEAD = "from jaxft import sweep\nfrom jaxft.config import base_config\n"
_SWEEP = "\n\ndef get_sweep():\n    return sweep.grid({'train.steps': [1, 2]}, kind='sft')\n"
# name: (the file after _HEAD, then _SWEEP: it is a sweep file too), what the one line says
BAD_CONFIG_FILES = {
    "syntax": ("def get_config(arg=None)\n    return base_config()", ["line 3: SyntaxError: expected ':'"]),
    "import": ("import not_a_module_xyz\ndef get_config(arg=None):\n    return base_config()",
               ["line 3: ModuleNotFoundError: No module named 'not_a_module_xyz'"]),
    "name": ("X = undefined_name\ndef get_config(arg=None):\n    return base_config()",
             ["line 3: NameError: name 'undefined_name' is not defined"]),
    "get_config raises": ("def get_config(arg=None):\n    c = base_config()\n    c.train.steps = int('ten')\n"
                          "    return c", ["line 5: ValueError: invalid literal for int() with base 10: 'ten'"]),
    "no get_config": ("def get_conf(arg=None):\n    return base_config()", ["has no get_config() function"]),
}
_SWEEP_FLAGS = ["--sweep", "train.steps=1,2"]
CONFIG_COMMANDS = {  # command: argv for config file F and scratch folder T
    "sft": lambda f, t: ["sft", "--config", f, "--workdir", f"{t}/w"],
    "dpo": lambda f, t: ["dpo", "--config", f"{f}:tiny", "--workdir", f"{t}/w", "--config.train.steps=2"],
    "check-data": lambda f, t: ["check-data", "--config", f],
    "plan": lambda f, t: ["plan", "--config", f, "--target", "v5p-8"],
    "sweep --kind": lambda f, t: ["sweep", "--config", f, "--kind", "sft", *_SWEEP_FLAGS, "--workdir", f"{t}/w"],
    "sweep": lambda f, t: ["sweep", "--config", f, *_SWEEP_FLAGS, "--workdir", f"{t}/w", "--print-commands"],
    "sweep file": lambda f, t: ["sweep", f, "--workdir", f"{t}/w"],
}


@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
def test_a_failing_config_file_is_one_line_naming_file_and_line_in_every_command(command, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # `jaxft plan` sets it; keep this process as it was
    for name, (body, says) in BAD_CONFIG_FILES.items():
        file = tmp_path / f"{name.replace(' ', '_')}.py"
        file.write_text(_HEAD + body + _SWEEP)
        line = one_error_line(CONFIG_COMMANDS[command](str(file), tmp_path), capsys)
        flag = "sweep file" if command == "sweep file" else "--config"
        assert line.startswith(f"jaxft {command.split()[0]}: {flag} {file}"), (name, line)
        for text in says:
            assert text in line, (name, line)
        assert "unexpected" not in line and "jaxft bug" not in line
        assert not (tmp_path / "w").exists()  # nothing written: the file fails before any run starts


def test_a_config_file_importing_a_broken_module_names_both(tmp_path):
    (tmp_path / "helper_mod.py").write_text("x = (\n")
    config = tmp_path / "uses_helper.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport helper_mod\n"
                      "def get_config():\n    return None\n")
    with pytest.raises(ValueError) as err:
        config_lib.load(str(config))
    message = str(err.value)
    assert message.startswith(f"config file {config}: line 3: SyntaxError: ")
    assert f"({tmp_path / 'helper_mod.py'} line 1)" in message
    config.write_text("def get_config():\n    return {'train': {}}\n")
    with pytest.raises(ValueError, match=r"get_config\(\) returned dict, not the ml_collections.ConfigDict"):
        config_lib.load(str(config))
