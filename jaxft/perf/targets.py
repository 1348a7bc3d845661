"""The accelerator slices `jaxft plan` plans for: TPU topologies libtpu compiles for without a TPU
(`topology_devices`), and GPU hosts, which get an analytic estimate only."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from jaxft.errors import ConfigError, SetupError

INSTALL_HINT = 'pip install "jaxft[tpu]" (or "jax[tpu]" at your jax version)'


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `topology` is libtpu's name (None for GPUs: not compiled here)."""
    name: str
    topology: str | None
    chips: int
    hbm_gib: float  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    topology_kwargs: tuple = ()  # extra get_topology_desc arguments, as (key, value) pairs


def _tpus(gen: str, hbm: float, peak: float, shapes: dict[int, str], per_chip: int, **kw) -> dict:
    # Cloud TPU names v4 / v5p slices by TensorCores (2 a chip) and v5e / v6e by chips. A
    # single chip is smaller than libtpu's default host (2x2x1): say so.
    one = {"chips_per_host_bounds": (1, 1, 1)}
    return {f"{gen}-{n}": Target(f"{gen}-{n}", f"{gen}:{shape}", n // per_chip, hbm, peak,
                                 tuple({**kw, **(one if n == per_chip else {})}.items()))
            for n, shape in shapes.items()}


_LITE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Shapes as Cloud TPU documents them. v4 chips show up as 2 devices unless "megacore" (one
# device a chip, as JAX runs v4).
TARGETS: dict[str, Target] = {
    **_tpus("v4", 32, 275e12, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4"}, 2,
            chip_config_name="megacore"),
    **_tpus("v5p", 95, 459e12, {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4",
                                256: "4x4x8", 512: "4x8x8"}, 2),
    **_tpus("v5e", 16, 197e12, _LITE_SHAPES, 1),
    **_tpus("v6e", 32, 918e12, _LITE_SHAPES, 1),
    "8xH100": Target("8xH100", None, 8, 80, 989e12),
    "8xH200": Target("8xH200", None, 8, 141, 989e12),
}


def get_target(name: str) -> Target:
    """The TARGETS entry `name` (e.g. "v5p-8"); a ValueError listing the known ones otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def topology_devices(target: Target) -> list:
    """The compile-only devices of a TPU target's topology (libtpu, no TPU needed)."""
    # Checked here: without libtpu JAX's topology call fails with "JAX TPU support not
    # installed; cannot generate TPU topology", which names no extra to install.
    if importlib.util.find_spec("libtpu") is None:
        raise SetupError(f"planning for {target.name} compiles for a TPU through libtpu, which is not "
                           f"installed: {INSTALL_HINT}")
    from jax.experimental import topologies

    from jaxft.platforms import tpu_present

    # libtpu takes /tmp/libtpu_lockfile for the process that loads it, so a second plan or a
    # test run alongside would fail ("ABORTED ... lockfile"). This process only compiles for
    # compile-only devices, so it may share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not tpu_present():
        # Off a TPU VM libtpu finds no accelerator type or worker hostnames in the metadata
        # and prints errors for both ("Failed to find host bounds ..."). The topology is named
        # explicitly, so say them: the compile-only devices are the same either way.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                        **dict(target.topology_kwargs))
    if len(topo.devices) != target.chips:
        raise RuntimeError(f"{target.topology} resolved to {len(topo.devices)} devices, expected {target.chips}")
    return list(topo.devices)


