"""Data parallelism over a `Mesh` of every device: the batch sharded along "data", the state replicated.

The same code runs on one CPU, several GPUs and a multi-host TPU slice: each host builds its slice of the global batch
and `jax.make_array_from_process_local_data` assembles the global array; XLA inserts the cross-device reductions (the
gradient mean, BatchNorm's batch statistics), so the result is the single-device one up to float summation order.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("train")
DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool) -> None:
    """`jax.distributed.initialize()` when asked to or when a coordinator is configured in the environment.

    Must run before any other JAX call. On Cloud TPU and SLURM/Open MPI clusters the arguments are discovered
    automatically; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if not (enabled or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
             jax.device_count())


def make_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings on `mesh`."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; use a multiple "
                         f"of {n}")


def global_batch(local: dict, batched: NamedSharding) -> dict:
    """This host's numpy slice of the batch -> global jax arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(batched, np.asarray(v)) for k, v in local.items()}


def replicate(tree, replicated: NamedSharding):
    return jax.device_put(tree, replicated)
