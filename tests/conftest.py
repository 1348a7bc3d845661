"""Test set-up: 8 virtual CPU devices, no hub access, loud JAX mistakes."""

import os
import tempfile

import pytest

# Must happen before JAX initialises its backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole session (pytest-xdist's workers share it
# through their run id; subprocesses inherit it): the suite compiles the same tiny-model steps
# in dozens of tests, and a hit costs milliseconds instead of seconds. Fresh every session,
# unless JAXFT_TEST_XLA_CACHE names a folder kept between sessions (.ci/run keeps one in
# ~/.cache): then only the programs a change touched compile (test_bench's fixture: 369 s cold,
# 50 s warm). XLA keys an entry by the program, the jax / jaxlib versions, backend and flags, so
# nothing is reused for another program, and an entry that does not read back is compiled again.
# Capped at 2 GiB, least recently used first out.
if os.environ.get("JAXFT_TEST_XLA_CACHE"):
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["JAXFT_TEST_XLA_CACHE"])
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"jaxft-test-xla-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID') or os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "subprocess: trains in child processes (signals, kill -9, jax.distributed); the newest-JAX "
        "stage of .ci/run leaves these out: process-level behaviour, proven once in the main stage")


# The slowest files first (CI's main stage, issue 23): with `--dist loadfile --no-loadscope-reorder`
# (pyproject's addopts) the two workers take whole files in this order, so the long ones start
# at once and the many short ones fill the end. xdist's own order (most tests first) put the
# one-test files, the slowest (test_quickstart: 170 s), last, where one worker could run alone
# for minutes. By CI's --durations (cold cache); test_quickstart trains, so a warm cache
# shortens it least.
SLOWEST_FIRST = ("test_multihost.py", "test_quickstart.py", "test_lora.py", "test_loss_paths.py", "test_bench.py",
                 "test_train_run.py", "test_notebooks.py", "test_dpo.py", "test_sweep.py", "test_context_parallel.py",
                 "test_run_safety.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
