"""One update on many devices, in the memory they have.

A (data x fsdp) device mesh: parameters and optimizer state are split FSDP-style over the fsdp axis (each array along
its largest axis that the axis size divides), the batch's rows over every device. An update's micro-batches are sized
to a token budget (microbatch.LengthSortedUpdate; the default budget is estimates.default_update_tokens').
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import grpo
import model as lm
from engine import estimates, microbatch


def make_mesh(data: int = 1, fsdp: int = -1) -> Mesh:
    devices = np.array(jax.devices())
    fsdp = len(devices) // data if fsdp == -1 else fsdp
    return Mesh(devices.reshape(data, fsdp), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], size: int) -> PartitionSpec:
    """Shard an array's largest axis that the fsdp size divides; replicate it if none does (norms, scalars)."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= size and shape[axis] % size == 0:
            return PartitionSpec(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return PartitionSpec()


def state_sharding(tree, mesh: Mesh):
    """A NamedSharding for every leaf of a pytree of arrays (parameters, optimizer state, ...)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device; a batch's row count is padded to a multiple of the device count."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def sized_update(objective: grpo.Objective, optimizer, state: grpo.TrainState, mesh: Mesh, token_budget: int,
                 config: lm.Config | None = None):
    """An update(state, batch) whose gradient is summed over micro-batches of at most token_budget tokens per device
    (microbatch.LengthSortedUpdate: rows sorted by length, each micro-batch cut to its longest row), each split over
    every device, with the state kept sharded. Given the model's config, its metrics count the update's model FLOPs."""
    shard = functools.partial(jax.device_put, device=batch_sharding(mesh))
    flops = None if config is None else functools.partial(estimates.training_flops, config)
    return microbatch.LengthSortedUpdate(objective, optimizer, token_budget, shard, state_sharding(state, mesh),
                                         mesh.size, flops=flops)


def place(tree, mesh: Mesh):
    """A sharded copy of tree (never an alias: updates donate their state, which must not free the caller's arrays)."""
    shardings = state_sharding(tree, mesh)
    if jax.process_count() > 1:  # a process-local jax.Array put on a mesh over several processes comes out broken (a
        # replicated one has too many shards; JAX 0.10): those go from the host, as numpy, which every process holds
        tree = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True) else x, tree)
    return jax.device_put(tree, shardings, may_alias=False)
