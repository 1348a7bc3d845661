"""jaxft: supervised fine-tuning and DPO for Hugging Face decoder LLMs in JAX / Flax NNX."""

import importlib.util
import os

# First, before any jaxft module imports jax (the `jaxft` command enters through this file
# too): on a machine with libtpu but no TPU, ask JAX for the CPU so libtpu does not print its
# start-up errors (jaxft/platforms.py).
from jaxft.platforms import use_cpu_without_accelerators

use_cpu_without_accelerators()

# jaxft uses transformers for tokenizers and configs only, never its torch models; without
# torch (a plain `pip install jaxft`) transformers' one advisory warning would tell every run
# "PyTorch was not found. Models won't be available".
if importlib.util.find_spec("torch") is None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
