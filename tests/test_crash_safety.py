"""Every file jaxft writes survives a kill at any write: exports (HF and PEFT folders),
metrics.jsonl, the tokenised data cache, the DPO reference log-prob cache and the small JSON
records. Each writer is killed at every file write and rename it makes (fault injection:
`Kill` raises at the k-th and lets no cleanup run, as a real kill would not), then the same
call is rerun: it succeeds, and what it leaves is complete and equal to an uninterrupted
write. metrics.jsonl's torn last line is also made by a real SIGKILL in a child process.
"""

import builtins
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxft.io import atomic
from jaxft.io.metrics import MetricsWriter, read_metrics


class Killed(BaseException):
    """The process is gone from here on (BaseException: no `except Exception` swallows it)."""


class Kill:
    """Counts the file writes and renames made under `root` (open for writing, safetensors'
    save_file, os.replace / os.rename) and kills the caller at the `at`-th: a file opened for
    writing is left empty, a safetensors file half-written, a rename not done. From then on
    every write raises again and cleanup does nothing (shutil.rmtree, Path.unlink): what is left
    on disk is what a kill at that point leaves. `at=None` only counts."""

    def __init__(self, root: Path, at: int | None = None):
        self.root, self.at, self.events, self.dead = str(root), at, [], False

    def _event(self, what: str, path, torn=None) -> None:
        if not os.fspath(path).startswith(self.root):
            return
        if self.dead:
            raise Killed(what)
        self.events.append(f"{what} {Path(path).name}")
        if len(self.events) == self.at:
            self.dead = True
            if torn is not None:
                torn()
            raise Killed(self.events[-1])

    def __enter__(self):
        from jaxft.models import hf, peft

        self._patch = pytest.MonkeyPatch()
        real_open, real_replace, real_rename = builtins.open, os.replace, os.rename
        real_rmtree, real_unlink = shutil.rmtree, pathlib.Path.unlink

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
                self._event("open", file, torn=lambda: real_open(file, mode).close())
            return real_open(file, mode, *args, **kwargs)

        def rename(real):
            def call(src, dst, *args, **kwargs):
                self._event("rename", dst)
                return real(src, dst, *args, **kwargs)
            return call

        def save_file(real):
            def call(tensors, filename, *args, **kwargs):
                self._event("save_file", filename, torn=lambda: Path(filename).write_bytes(b"\x08\x00\x00\x00torn"))
                return real(tensors, filename, *args, **kwargs)
            return call

        self._patch.setattr(builtins, "open", open_)
        self._patch.setattr(io, "open", open_)  # pathlib's Path.open
        self._patch.setattr(os, "replace", rename(real_replace))
        self._patch.setattr(os, "rename", rename(real_rename))
        self._patch.setattr(hf, "save_file", save_file(hf.save_file))
        self._patch.setattr(peft, "save_file", save_file(peft.save_file))
        self._patch.setattr(shutil, "rmtree", lambda *a, **k: None if self.dead else real_rmtree(*a, **k))
        self._patch.setattr(pathlib.Path, "unlink",
                            lambda p, missing_ok=False: None if self.dead else real_unlink(p, missing_ok))
        return self

    def __exit__(self, kind, err, tb):
        self._patch.undo()
        return kind is Killed  # the kill ends the call; the test goes on as the next command


def count_writes(root: Path, call) -> int:
    with Kill(root) as kill:
        call()
    assert kill.events, "the call wrote nothing under the test folder: the injection does not see it"
    return len(kill.events)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- exports -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A one-layer model and LoRA adapters of two seeds each: (write(out, seed), layout) per kind."""
    import jax
    from flax import nnx

    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.io.export import export_adapter, export_params
    from jaxft.models import create_model, get_preset
    from jaxft.models.adapters import init_adapters
    from jaxft.models.lora import PROJECTIONS, LoRASpec
    from jaxft.parallel import sharding

    tok = load_bundled_tokenizer()
    # test_lora's sizes: its compilations are in the session's XLA cache.
    cfg = get_preset("tiny").replace(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2,
                                     num_heads=4, num_kv_heads=2)
    graphdef, state = nnx.split(create_model(cfg, seed=7), nnx.Param)
    params = nnx.to_pure_dict(state)
    models = {1: (graphdef, params), 2: (graphdef, jax.tree.map(lambda x: x * 2, params))}
    lora = cfg.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        _, fresh = init_adapters(lora, seed=0, mesh=mesh)
        adapters = {1: fresh, 2: jax.tree.map(lambda x: x + 1, fresh)}

    def hf(out, seed):
        return export_params(*models[seed], out, tokenizer=tok)

    def peft(out, seed):
        with jax.set_mesh(mesh):
            return export_adapter(lora, adapters[seed], out, base_model="base", tokenizer=tok)

    return {"hf": hf, "peft": peft}


@pytest.mark.parametrize("layout", ["hf", "peft"])
def test_an_export_killed_at_any_write_reruns_as_is(tmp_path, tiny, layout):
    from jaxft.io.export import check_export_target

    write = tiny[layout]
    old, new = snapshot(write(tmp_path / "old", 1)), snapshot(write(tmp_path / "new", 2))
    assert old != new and "jaxft_export.json" in new
    for over_old in (False, True):  # a first export, and one over an earlier export of the folder
        case = tmp_path / ("over" if over_old else "fresh")
        case.mkdir()

        def prepare(k):
            out = case / f"k{k}"
            if over_old:
                write(out, 1)
            return out

        first = prepare(0)
        n = count_writes(case, lambda: write(first, 2))
        assert n >= 5  # marker, config / adapter config, weights, tokenizer files, the rename(s)
        for k in range(1, n + 1):
            out = prepare(k)
            with Kill(case, at=k):
                write(out, 2)
                pytest.fail(f"not killed at write {k}")
            # Readers see the previous export or none (a kill between the two renames parks the
            # old one under a hidden temporary name), never half a folder.
            assert not out.exists() or snapshot(out) == old, k
            assert check_export_target(out, layout) == out  # the same export may go there
            write(out, 2)  # the command rerun as is
            assert snapshot(out) == new, k
            assert atomic.leftovers(out) == [], k


# --- metrics.jsonl -------------------------------------------------------------------------------


ROWS = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)]


def metrics_file(workdir: Path, rows=ROWS, tail: str = "") -> Path:
    path = workdir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_a_torn_last_metrics_line_is_skipped_with_a_warning_and_repaired_on_resume(tmp_path, caplog):
    path = metrics_file(tmp_path, tail=json.dumps({"step": 4, "loss": 0.5})[:13])
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        assert read_metrics(tmp_path) == ROWS
    assert any(f"{path} line 4" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        writer = MetricsWriter(tmp_path, report_to="none", start_step=3)  # resume from step 3's checkpoint
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in ROWS)  # torn line gone, atomically
    assert [f"{path} line 4" in r.getMessage() and "removed" in r.getMessage() for r in caplog.records] == [True]
    caplog.clear()
    writer.write(4, {"loss": 0.5})
    writer.close()
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert not caplog.records and atomic.leftovers(path) == []


@pytest.mark.parametrize("bad", ['{"step": 2, "loss": 1.0', "garbage", '["not a row"]', '{"loss": 1.0}'])
def test_a_damaged_metrics_line_before_the_last_names_the_file_and_line(tmp_path, bad):
    lines = [json.dumps(r) for r in ROWS]
    lines[1] = bad
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metrics.jsonl'} line 2: .*fix or delete that line"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
        MetricsWriter(tmp_path, report_to="none", start_step=3)


def test_a_metrics_line_torn_by_sigkill_does_not_stop_resume_or_compare(tmp_path, caplog):
    from jaxft.sweep.compare import compare

    path = metrics_file(tmp_path)
    half = json.dumps({"step": 4, "loss": 0.25, "learning_rate": 1e-3})[:20]
    child = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "f = open(sys.argv[1], 'a'); f.write(sys.argv[2]); f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)"), str(path), half])
    assert child.returncode == -signal.SIGKILL and path.read_text().endswith(half)
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        table = compare([tmp_path], out_dir=tmp_path / "cmp")
    assert table.rows[0]["steps"] == 3 and (tmp_path / "cmp" / "compare.csv").is_file()
    assert any(f"{path} line 4" in r.getMessage() for r in caplog.records)
    MetricsWriter(tmp_path, report_to="none", start_step=3).close()
    assert read_metrics(tmp_path) == ROWS and path.read_text().endswith("\n")


def test_a_metrics_writer_killed_at_any_write_leaves_whole_rows(tmp_path):
    """The resume rewrite (rows past the checkpoint dropped) and the appends after it."""
    def resume_and_log(workdir):
        writer = MetricsWriter(workdir, report_to="none", start_step=2)
        writer.write(3, {"loss": 0.75})
        writer.close()

    metrics_file(tmp_path)
    n = count_writes(tmp_path, lambda: resume_and_log(tmp_path))
    for k in range(1, n + 1):
        workdir = tmp_path / f"k{k}"
        workdir.mkdir()
        metrics_file(workdir)
        with Kill(workdir, at=k):
            resume_and_log(workdir)
        assert read_metrics(workdir) in (ROWS, ROWS[:2]), k  # the old rows, or the rewritten ones
        resume_and_log(workdir)
        assert read_metrics(workdir) == ROWS[:2] + [{"step": 3, "loss": 0.75}], k


# --- caches and records --------------------------------------------------------------------------


def test_a_tokenised_cache_build_killed_at_any_write_is_rebuilt_whole(tmp_path, monkeypatch):
    from jaxft.data import tokenize
    from jaxft.data.assets import quickstart_file
    from jaxft.data.from_config import load_bundled_tokenizer
    from jaxft.data.tokenize import load_examples

    tok = load_bundled_tokenizer()
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(quickstart_file("sft_train.jsonl").read_text().splitlines()[:40]) + "\n")
    plain = load_examples(str(source), tok, kind="sft", max_length=64)

    def load(cache_dir):
        return load_examples(str(source), tok, kind="sft", max_length=64, cache_dir=cache_dir)

    n = count_writes(tmp_path / "c0", lambda: load(tmp_path / "c0"))
    for k in range(1, n + 1):
        cache_dir = tmp_path / f"c{k}"
        with Kill(cache_dir, at=k):
            load(cache_dir)
        assert [p for p in cache_dir.iterdir() if ".tmp-" not in p.name] == [], k  # no cache, only a tmp folder
        again = load(cache_dir)  # rerun: tokenised and cached
        assert [e.input_ids.tolist() for e in again.examples] == [e.input_ids.tolist() for e in plain.examples]
    with monkeypatch.context() as m:  # the last one is whole: read back, nothing tokenised
        m.setattr(tokenize, "tokenize_source", lambda *a, **k: pytest.fail("tokenised again"))
        cached = load(cache_dir)
    assert [e.loss_mask.tolist() for e in cached.examples] == [e.loss_mask.tolist() for e in plain.examples]


def test_a_reference_logprob_cache_killed_at_any_write_is_recomputed_whole(tmp_path):
    from jaxft.tasks import dpo_reference

    key = {"data": "pairs.jsonl", "fingerprint": "abc"}
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    n = count_writes(tmp_path / "w0", lambda: dpo_reference.cached_table(tmp_path / "w0", key, lambda: table))
    assert n == 4  # the .json and the .npy, each a temporary file and a rename
    for k in range(1, n + 1):
        workdir = tmp_path / f"w{k}"
        with Kill(workdir, at=k):
            dpo_reference.cached_table(workdir, key, lambda: table)
        np.testing.assert_array_equal(dpo_reference.cached_table(workdir, key, lambda: table + 0), table)
        (path,) = (workdir / dpo_reference.CACHE_SUBDIR).glob("*.npy")
        np.testing.assert_array_equal(np.load(path), table)
        assert json.loads(path.with_suffix(".json").read_text()) == key
        assert atomic.leftovers(path) == [] and atomic.leftovers(path.with_suffix(".json")) == []


def test_a_sweep_record_killed_while_written_keeps_the_old_one(tmp_path):
    from jaxft.sweep.runner import _write

    path = tmp_path / "sweep_run.json"
    _write(path, {"status": "running"})
    n = count_writes(tmp_path, lambda: _write(path, {"status": "done"}))
    for k in range(1, n + 1):
        _write(path, {"status": "running"})
        with Kill(tmp_path, at=k):
            _write(path, {"status": "done"})
        assert json.loads(path.read_text()) == {"status": "running"}, k
        _write(path, {"status": "done"})
        assert json.loads(path.read_text()) == {"status": "done"} and atomic.leftovers(path) == []
