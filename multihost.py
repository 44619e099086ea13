"""multihost.py: one run as one program over several processes (multi-controller JAX), and nothing more when alone.

Every process runs the same program with the same seeds: the same rollouts, the same host-side batches, every update
on the global device mesh. Three things differ from a single process:

- the cluster is joined first (`initialize`), with gloo collectives when the devices are CPUs;
- an array spread over other processes' devices cannot be read on the host directly: `to_host` gathers it (every
  process must call it, at the same point: it is a collective);
- files are written once: by process 0 (`is_primary`), apart from Orbax's checkpoints, which every process saves.

In a single process `to_host` is `jax.device_get` and `is_primary` is True: nothing changes.
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Join the cluster before any other JAX call. Unset values are JAX's to find: $JAX_COORDINATOR_ADDRESS, or the
    cluster it detects (SLURM, Open MPI, Kubernetes, TPU pods); on a plain machine pass all three."""
    # CPU devices in different processes have no collectives unless asked for; accelerators bring their own (NCCL,
    # ICI) and ignore this setting
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, TensorBoard, args.json, plots, the exported model)."""
    return jax.process_index() == 0


def to_host(tree):
    """tree's arrays as numpy arrays in every process: jax.device_get, except that an array with shards on other
    processes' devices is gathered first (its replicated value read from a local shard, else process_allgather)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def read(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(read, tree)


def smallest(value: int) -> int:
    """The smallest of every process's value: what a process measures for itself (e.g. its free memory) but every
    process must agree on, since they all run one program."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def barrier(name: str) -> None:
    """Wait until every process gets here (e.g. until all have read a file one of them is about to rewrite)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
