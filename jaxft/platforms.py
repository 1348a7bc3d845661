"""Which JAX platforms a jaxft process asks for: the CPU alone where libtpu would only make noise.

With JAX_PLATFORMS unset, JAX tries every backend it knows, the TPU one included whenever
libtpu is installed (the `tpu` and `test` extras bring it, for `jaxft plan`). On a machine
with no TPU chips that attempt fails, and JAX falls back to the CPU, but libtpu has already
written its start-up errors to stderr ("Failed to find host bounds for accelerator type ...",
"E0000 ... unexpected worker hostname ..."). So where JAX's own hardware checks find no TPU
and no GPU, jaxft sets JAX_PLATFORMS=cpu before JAX reads it: the backend JAX would have
ended on, without the failed libtpu start.

Left alone: a JAX_PLATFORMS (or jax_platforms config) the user set, JAX_FORCE_TPU_INIT, a
machine without libtpu (nothing to quiet; e.g. macOS, where jax-metal must stay reachable),
and any machine with a TPU or a GPU: a TPU VM gets TPU + CPU, a CUDA host its plugin.
`jaxft plan` still loads libtpu: `jax.experimental.topologies` loads it for the compile-only
topology whatever JAX_PLATFORMS says.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys


@functools.cache
def _jax_hardware_utils():
    """JAX's hardware checks (jax/_src/hardware_utils.py, standard library only), loaded from
    its file: importing it as jax._src.hardware_utils would import jax, which reads
    JAX_PLATFORMS once, on import. None when this jax has no such file."""
    spec = importlib.util.find_spec("jax")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "_src", "hardware_utils.py")
    try:
        module_spec = importlib.util.spec_from_file_location("_jaxft_jax_hardware_utils", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    except (OSError, ImportError, SyntaxError):
        return None


def tpu_present() -> bool:
    """True where JAX might find TPU chips here (or we cannot tell).

    Counted the way JAX counts them before it starts a backend (Google PCI device ids under
    /sys/bus/pci); TPU device files (/dev/accel* up to v4, /dev/vfio/N from v5e) count too,
    in case /sys is hidden from a container.
    """
    hw = _jax_hardware_utils()
    try:
        if hw is None or hw.num_available_tpu_chips_and_device_id()[0] > 0:
            return True
    except (OSError, AttributeError, TypeError):  # a jax whose helper changed: assume a TPU
        return True
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def gpu_present() -> bool:
    """True where JAX might find a GPU here (or we cannot tell): JAX's checks for NVIDIA device
    files and AMD's KFD nodes, the ones it makes before starting a GPU backend."""
    hw = _jax_hardware_utils()
    try:
        if hw is None or hw.has_visible_nvidia_gpu():
            return True
        count_amd = getattr(hw, "num_available_amd_gpus", None)  # jax >= 0.7
        return count_amd is not None and count_amd(stop_at=1) != 0  # -1: could not tell
    except (OSError, AttributeError, TypeError):
        return True


def use_cpu_without_accelerators() -> None:
    """Sets JAX_PLATFORMS=cpu where libtpu is installed but this machine has no TPU and no GPU.

    Call it before anything imports jax (jaxft/__init__.py does). If jax was imported first
    (a notebook's `import jax` above `import jaxft`), sets the jax_platforms config instead,
    which still counts until JAX starts its backends.
    """
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    jax_config = getattr(sys.modules.get("jax"), "config", None)  # None until jax is imported
    if getattr(jax_config, "jax_platforms", None) is not None:
        return  # set in code by the user
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return  # no libtpu: JAX's TPU attempt is silent
    if tpu_present() or gpu_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # children (data workers, subprocess runs) inherit it
    if jax_config is not None:
        jax_config.update("jax_platforms", "cpu")
