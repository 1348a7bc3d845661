"""A quiet start: on a machine without a TPU, jaxft prints nothing of libtpu's (it is installed
with the test and tpu extras, for `jaxft plan`), and `jaxft plan` without libtpu says what to
install in one line."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxft import cli, platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def newcomer(code: list[str]) -> subprocess.CompletedProcess:
    """`code` run as a fresh shell would run it: no JAX_PLATFORMS (conftest sets it for the
    suite), and none of the variables libtpu, `jaxft plan` and jaxft's import may have left in
    this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_"))
           and k not in ("ALLOW_MULTIPLE_LIBTPU_LOAD", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    return subprocess.run([sys.executable, *code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_and_help_write_nothing_to_stderr():
    for code in (["-c", "import jaxft"], ["-m", "jaxft.cli", "--help"]):
        proc = newcomer(code)
        assert proc.returncode == 0 and proc.stderr == "", (code, proc.stderr)


def test_without_torch_transformers_does_not_warn_that_models_are_unavailable():
    # `pip install jaxft` has no torch (the test extra brings it): transformers would print
    # "PyTorch was not found. Models won't be available ..." at the top of every run.
    proc = newcomer(["-c", "import sys; sys.modules['torch'] = None; import jaxft, transformers"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: nothing would print")
@pytest.mark.skipif(platforms.tpu_present() or platforms.gpu_present(), reason="an accelerator: JAX chooses here")
@pytest.mark.parametrize("imports", ["import jaxft, jax", "import jax, jaxft"])  # a notebook may import jax first
def test_starting_the_backend_through_jaxft_prints_nothing_of_libtpus(imports):
    # Without jaxft's guard, libtpu writes "Failed to find host bounds for accelerator type ..."
    # and "E0000 ... unexpected worker hostname ..." here before JAX falls back to the CPU.
    proc = newcomer(["-c", f"{imports}; print(jax.devices()[0].platform)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"
    assert proc.stderr == ""


@pytest.mark.parametrize("tpu, gpu, user, expected", [
    (False, False, None, "cpu"),  # a CPU machine with libtpu: the CPU, asked for up front
    (True, False, None, None),  # a TPU VM: JAX picks TPU + CPU itself
    (False, True, None, None),  # a GPU host: JAX picks its CUDA / ROCm plugin itself
    (False, False, "", ""),  # the user's own choice, even "" (every backend), is kept
    (False, False, "tpu", "tpu"),
])
def test_jax_platforms_is_set_only_on_a_cpu_machine_and_never_over_the_users(monkeypatch, tpu, gpu, user, expected):
    monkeypatch.setitem(sys.modules, "jax", None)  # as if jax were not imported yet
    monkeypatch.setattr(platforms, "tpu_present", lambda: tpu)
    monkeypatch.setattr(platforms, "gpu_present", lambda: gpu)
    monkeypatch.setenv("TPU_LIBRARY_PATH", "libtpu.so")  # libtpu installed, as far as the guard can tell
    monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
    if user is None:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
        monkeypatch.setenv("JAX_PLATFORMS", user)
    platforms.use_cpu_without_accelerators()
    assert os.environ.get("JAX_PLATFORMS") == expected


def test_plan_without_libtpu_says_which_extra_to_install_in_one_line(monkeypatch):
    # What a machine without libtpu looks like to jax and to importlib (jax's own error would be
    # "JAX TPU support not installed; cannot generate TPU topology", naming no extra).
    monkeypatch.setitem(sys.modules, "libtpu", None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # `jaxft plan` sets it when unset: restore it after
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--config", os.path.join(ROOT, "configs/sft.py:tiny"), "--target", "v5p-8"])
    error = str(exit_info.value).splitlines()[0]
    assert error.startswith("jaxft plan: error: planning for v5p-8 compiles for a TPU through libtpu")
    assert 'pip install "jaxft[tpu]"' in error and "unexpected" not in error
