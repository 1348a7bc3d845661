"""Host-local numpy batches -> global `jax.Array`s on the mesh.

Every host builds only its own rows (`jaxft.data.pipeline`); `to_global` stitches the hosts'
rows into one array split over the (data, fsdp, expert) mesh axes (and its tokens over sequence: each
host holds whole rows, and its devices take their token slices of them). Per-pair arrays of a DPO batch
already describe the whole global batch on every host (global row numbers), so they are
placed replicated as they are, with no cross-host communication.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxft.parallel.sharding import batch_sharding, replicated

HOST_ONLY_FIELDS = ("example_index",)  # bookkeeping for the host, never sent to the devices


def to_global(batch_np, mesh) -> dict[str, jax.Array]:
    """A host's `SFTBatch` / `DPOBatch` -> {field: global array}: [R, L] fields split by rows
    over hosts and (data, fsdp, expert) and by tokens over sequence; [P] fields replicated."""
    rows, same_everywhere = batch_sharding(mesh), replicated(mesh)
    out = {}
    for field in dataclasses.fields(batch_np):
        if field.name in HOST_ONLY_FIELDS:
            continue
        value = np.asarray(getattr(batch_np, field.name))
        if value.ndim == 1:
            out[field.name] = jax.make_array_from_process_local_data(same_everywhere, value)
        else:  # global_shape's L == the host's L: devices slice their tokens from whole rows
            global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
            out[field.name] = jax.make_array_from_process_local_data(rows, value, global_shape)
    return out

