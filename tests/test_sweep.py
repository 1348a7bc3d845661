"""`jaxft sweep` / `jaxft compare`: a grid of runs in sub-workdirs, finished runs skipped and
unfinished ones resumed, commands to run by hand, SFT -> DPO pipelines, and a table of the
runs' own metrics with a PNG of their curves."""

import contextlib
import csv
import io
import json
import shlex
import shutil
from pathlib import Path

import pytest

from jaxft import cli, sweep
from jaxft.io.metrics import read_metrics
from tests.quickstart_subset import quickstart_head

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data")
    return {name: str(quickstart_head(folder, f"{name}.jsonl", lines))
            for name, lines in (("sft_train", 64), ("sft_eval", 16), ("pref_train", 32), ("pref_eval", 8))}


def small(data, kind="sft") -> list[str]:
    """--config.KEY=VALUE flags shrinking configs/{kind}.py:tiny to a few seconds a run."""
    prefix = "sft" if kind == "sft" else "pref"
    return [f"--config.data.train={data[prefix + '_train']}", f"--config.data.eval={data[prefix + '_eval']}",
            "--config.train.steps=2", "--config.train.batch_size=8", "--config.data.max_length=64",
            "--config.train.progress=False", "--config.train.log_every=1", "--config.optim.warmup_steps=0",
            "--config.train.save_every=1"]


def printed(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(argv)
    return out.getvalue()


GRID = ["--sweep", "optim.lr=1e-3,3e-3", "--sweep", "train.seed=0,1"]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, data):
    """A 2 x 2 sweep run by `jaxft sweep` (the table is printed at its end)."""
    folder = tmp_path_factory.mktemp("sweep") / "grid"
    output = printed(["sweep", "--config", f"{REPO}/configs/sft.py:tiny", *GRID, *small(data),
                      "--workdir", str(folder)])
    return folder, output


NAMES = ["lr=1e-3,seed=0", "lr=1e-3,seed=1", "lr=3e-3,seed=0", "lr=3e-3,seed=1"]


def final(workdir: Path, key: str) -> float:
    return [r[key] for r in read_metrics(workdir) if key in r][-1]


def test_a_2x2_sweep_gives_four_runs_and_a_table_of_their_own_metrics_and_curves(grid_sweep):
    folder, output = grid_sweep
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        config = json.loads((folder / name / "config.json").read_text())
        lr, seed = name.split(",")
        assert config["optim"]["lr"] == float(lr.split("=")[1]) and config["train"]["seed"] == int(seed.split("=")[1])
    rows = list(csv.DictReader((folder / "compare.csv").open()))
    assert [r["run"] for r in rows] == NAMES
    assert list(rows[0])[:3] == ["run", "optim.lr", "train.seed"]  # what sets the runs apart, only
    for r in rows:
        assert float(r["loss"]) == final(folder / r["run"], "loss")
        assert float(r["eval_loss"]) == final(folder / r["run"], "eval_loss")
        assert int(r["steps"]) == 2
    assert (folder / "compare.png").stat().st_size > 1000
    assert f"| {NAMES[0]} | 1e-3 | 0 | 2 |" in output  # the Markdown table
    # `jaxft compare` on the folder gives the same table.
    assert printed(["compare", str(folder)]).splitlines()[:6] == [x for x in output.splitlines() if x.startswith("|")]


def test_print_commands_run_by_hand_give_the_same_results(grid_sweep, data, tmp_path):
    folder, _ = grid_sweep
    lines = printed(["sweep", "--config", f"{REPO}/configs/sft.py:tiny", *GRID, *small(data), "--workdir",
                     str(tmp_path / "hand"), "--print-commands"]).splitlines()
    assert len(lines) == 4 and all(line.startswith("jaxft sft --config ") for line in lines)
    assert not (tmp_path / "hand").exists()  # printing runs nothing
    argv = shlex.split(lines[3])
    assert argv[argv.index("--workdir") + 1] == str(tmp_path / "hand" / NAMES[3])
    cli.main(argv[1:])
    for key in ("loss", "eval_loss", "grad_norm"):
        assert final(tmp_path / "hand" / NAMES[3], key) == final(folder / NAMES[3], key)


def test_a_rerun_skips_finished_runs_and_resumes_an_unfinished_one(grid_sweep, tmp_path, data):
    folder, _ = grid_sweep
    copy = tmp_path / "grid"
    shutil.copytree(folder, copy)
    # The last run as a killed sweep leaves it: step 1 saved, step 2 not, still "running".
    last = copy / NAMES[3]
    shutil.rmtree(last / "checkpoints" / "2")
    record = json.loads((last / "sweep_run.json").read_text())
    (last / "sweep_run.json").write_text(json.dumps({**record, "status": "running"}))
    untouched = {n: (copy / n / "metrics.jsonl").read_text() for n in NAMES[:3]}
    logged = []
    runs = sweep.grid({"optim.lr": ["1e-3", "3e-3"], "train.seed": ["0", "1"]}, kind="sft",
                      config=f"{REPO}/configs/sft.py:tiny",
                      overrides=dict(f.removeprefix("--config.").split("=", 1) for f in small(data)))
    result = sweep.run_sweep(runs, copy, log=logged.append)
    assert result.skipped == NAMES[:3] and result.finished == [NAMES[3]] and not result.failed
    assert sum("finished before, skipped" in line for line in logged) == 3
    assert {n: (copy / n / "metrics.jsonl").read_text() for n in NAMES[:3]} == untouched
    assert [r["loss"] for r in read_metrics(last) if "loss" in r] == \
        [r["loss"] for r in read_metrics(folder / NAMES[3]) if "loss" in r]  # resumed exactly
    # A finished run asked for with other settings is an error, not a silent reuse.
    other = [sweep.Run(r.name, r.kind, r.config, {**r.overrides, "train.steps": "3"}) for r in runs]
    with pytest.raises(ValueError, match=r"sweep run 'lr=1e-3,seed=0' in .* finished with other settings"):
        sweep.run_sweep(other, copy)


def test_a_pipeline_sweep_starts_dpo_from_the_sft_export(tmp_path, data):
    sweep_file = tmp_path / "pipeline.py"
    sweep_file.write_text(f'''
import jaxft.config
from jaxft.sweep import run

def get_config(arg=""):
    return jaxft.config.load("{REPO}/configs/sft.py:tiny")

def get_sweep():
    return [run("sft", kind="sft", config=""),
            run("sft_dpo", kind="dpo", config="{REPO}/configs/dpo.py:tiny",
                overrides={{"model.path": "@sft/hf", "data.train": "{data['pref_train']}",
                           "data.eval": "{data['pref_eval']}"}})]
''')
    # Listed DPO-first, it still runs after the SFT run it starts from.
    runs = sweep.load_sweep_file(str(sweep_file))
    assert [r.name for r in sweep.spec.check(runs[::-1])] == ["sft", "sft_dpo"]
    flags = [f for f in small(data) if not f.startswith(("--config.data.train", "--config.data.eval"))]
    output = printed(["sweep", str(sweep_file), *flags, f"--config.data.train={data['sft_train']}",
                      f"--config.data.eval={data['sft_eval']}", "--workdir", str(tmp_path / "pipe")])
    dpo_config = json.loads((tmp_path / "pipe" / "sft_dpo" / "config.json").read_text())
    assert dpo_config["model"]["path"] == str(tmp_path / "pipe" / "sft" / "hf")
    assert dpo_config["data"]["train"] == data["pref_train"]  # the run's own setting wins
    assert (tmp_path / "pipe" / "sft_dpo" / "hf" / "model.safetensors").is_file()
    assert "| sft_dpo |" in output and "| sft |" in output
    # The DPO run's first step: policy == reference == the SFT export, so the DPO term is ln 2.
    first = read_metrics(tmp_path / "pipe" / "sft_dpo")[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_sweep_mistakes_are_errors_naming_the_run_or_flag(tmp_path):
    sft = f"{REPO}/configs/sft.py:tiny"
    with pytest.raises(ValueError, match="refers to @nope, which is not a run of this sweep"):
        sweep.spec.check([sweep.run("a", kind="sft", config=sft, overrides={"model.path": "@nope/hf"})])
    with pytest.raises(ValueError, match="distinct names; repeated: a"):
        sweep.spec.check([sweep.run("a", kind="sft", config=sft), sweep.run("a", kind="sft", config=sft)])
    with pytest.raises(ValueError, match="in a circle: a -> b -> a"):
        sweep.spec.check([sweep.run("a", kind="sft", config=sft, overrides={"model.path": "@b/hf"}),
                          sweep.run("b", kind="sft", config=sft, overrides={"model.path": "@a/hf"})])
    with pytest.raises(ValueError, match=r"--zip pairs .* optim.lr: 2, train.seed: 3"):
        sweep.grid({"optim.lr": [1, 2], "train.seed": [0, 1, 2]}, kind="sft", config=sft, paired=True)
    with pytest.raises(ValueError, match=r"sweep run 'lrr=1': config key 'optim.lrr' does not exist"):
        sweep.run_sweep(sweep.grid({"optim.lrr": [1]}, kind="sft", config=sft), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written before every run's config loads
    assert sweep.parse_axis("dpo.loss_type=sigmoid|sigmoid,sft") == ("dpo.loss_type", ["sigmoid", "sigmoid,sft"])
    paired = sweep.grid({"optim.lr": [1, 2], "train.seed": [0, 1]}, kind="sft", config=sft, paired=True)
    assert [r.name for r in paired] == ["lr=1,seed=0", "lr=2,seed=1"]
    with pytest.raises(ValueError, match="pass --kind sft|dpo"):
        sweep.spec.infer_kind(str(tmp_path / "mine.py"))


def test_the_ablation_files_list_their_runs():
    ablations = REPO / "configs" / "ablations"
    epochs = sweep.load_sweep_file(str(ablations / "sft_epochs.py"))
    assert [r.name for r in epochs] == ["sft_epochs=1.0", "sft_epochs=2.0", "sft_epochs=4.0"]
    with_dpo = sweep.load_sweep_file(f"{ablations / 'sft_epochs.py'}:dpo")
    assert [r.overrides.get("model.path") for r in with_dpo[3:]] == [f"@{r.name}/hf" for r in epochs]
    pipeline = sweep.spec.check(sweep.load_sweep_file(str(ablations / "sft_vs_sft_dpo.py")))
    assert [(r.name, r.kind) for r in pipeline] == [("sft", "sft"), ("sft_dpo", "dpo")]
    losses = sweep.load_sweep_file(str(ablations / "dpo_loss_beta.py"))
    assert len(losses) == 7 and {r.overrides.get("dpo.loss_type") for r in losses[1:]} == {"sigmoid", "ipo", "hinge"}
    for r in [*epochs, *with_dpo, *pipeline, *losses]:  # every run's config loads
        import jaxft.config

        jaxft.config.load(r.config, sweep.spec.resolve_references(r.overrides, Path("/tmp/sweep")))
