"""Data parallelism with jax.sharding: a 1-D mesh over every device, the batch
split along its "data" axis, the train state replicated. Multi-host runs go
through `jax.distributed.initialize`; nothing here is home-made distribution.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Joins a multi-host run when JAX's coordinator variables are set.

    Set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID on
    every host; on a single host nothing happens.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))


def data_mesh(devices=None) -> Mesh:
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Returns the per-process batch size, or says why the global one doesn't split."""
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of "
                         f"devices ({mesh.size}) for data-parallel training")
    return batch_size // jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes a run's logs, plots and results (every process
    computes; orbax coordinates the checkpoint writes itself)."""
    return jax.process_index() == 0


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> NamedSharding:
    """Axis 0 (the batch) split over the mesh's data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_device(fn, mesh: Mesh):
    """`fn` of batch-first arrays run by each device on its own slice of the batch
    (`jax.shard_map`): for per-image work whose loops would otherwise wait for every
    device at every iteration (a vmapped while loop runs until all images are done).

    `fn` must not communicate between devices. The replication checks are off: its loops
    start from constants (replicated) and carry per-image values (varying)."""
    spec = PartitionSpec(DATA_AXIS)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Puts this process's slice of the global batch on its devices, split along B."""
    return {key: jax.make_array_from_process_local_data(batch_split(mesh), np.asarray(value))
            for key, value in local_batch.items()}


def shard_global_batch(array, mesh: Mesh) -> jax.Array:
    """Puts a batch that every process holds whole on the mesh, split along B: each process
    hands its own devices their rows."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_split(mesh), lambda index: array[index])
