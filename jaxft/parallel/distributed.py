"""Joining JAX's multi-controller runtime before anything touches the devices.

Every host runs the same `jaxft` command. `initialize()` calls `jax.distributed.initialize`:
  - with explicit JAXFT_COORDINATOR (host:port), JAXFT_NUM_PROCESSES, JAXFT_PROCESS_ID (local
    multi-process runs, launch/local_multiprocess.sh, and any launcher of your own);
  - with no arguments on TPU pods and SLURM, where JAX discovers the cluster itself;
  - not at all on a single host.
"""

from __future__ import annotations

import os

import jax

from jaxft.errors import ConfigError

_ENV = ("JAXFT_COORDINATOR", "JAXFT_NUM_PROCESSES", "JAXFT_PROCESS_ID")


def _on_cluster() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts  # a multi-host TPU slice lists every worker


def timeouts() -> dict:
    """Bounded waits, so a host that never arrives or dies makes the others fail, not hang:
    JAXFT_INIT_TIMEOUT (s, default 300) for every host to join, JAXFT_HEARTBEAT_TIMEOUT (s,
    default 100) of silence after which the runtime declares a host dead and stops the rest,
    JAXFT_SHUTDOWN_TIMEOUT (s, default 900) for every live host to reach the end: process 0
    exports the model after the last step while the others wait (JAX's 300 s was once too
    short on a loaded 2-core CI machine, and a missed barrier aborts a finished run)."""
    return dict(initialization_timeout=int(os.environ.get("JAXFT_INIT_TIMEOUT", 300)),
                heartbeat_timeout_seconds=int(os.environ.get("JAXFT_HEARTBEAT_TIMEOUT", 100)),
                shutdown_timeout_seconds=int(os.environ.get("JAXFT_SHUTDOWN_TIMEOUT", 900)))


def initialize() -> None:
    """Joins the cluster if this process is one of several; a no-op otherwise."""
    if all(k in os.environ for k in _ENV):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAXFT_COORDINATOR"],
            num_processes=int(os.environ["JAXFT_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXFT_PROCESS_ID"]),
            **timeouts(),
        )
    elif any(k in os.environ for k in _ENV):
        missing = [k for k in _ENV if k not in os.environ]
        raise ConfigError(f"multi-process run: set all of {', '.join(_ENV)} (missing {', '.join(missing)})")
    elif _on_cluster():
        jax.distributed.initialize(**timeouts())
