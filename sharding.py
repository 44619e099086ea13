"""sharding.py: one update on many devices, in the memory they have.

A (data x fsdp) device mesh: parameters and optimizer state are split FSDP-style over the fsdp axis (each array along
its largest axis that the axis size divides), the batch's rows over every device. An update's micro-batches are sized
to a token budget (grpo.LengthSortedUpdate), by default derived from the model's activation memory per token and the
memory a device has free.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import grpo
import model as lm


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
    (grpo.LengthSortedUpdate: rows sorted by length, each micro-batch cut to its longest row), each split over every
    device, with the state kept sharded. Given the model's config, its metrics count the update's model FLOPs."""
    shard = functools.partial(jax.device_put, device=batch_sharding(mesh))
    flops = None if config is None else functools.partial(lm.training_flops, config)
    return grpo.LengthSortedUpdate(objective, optimizer, token_budget, shard, state_sharding(state, mesh), mesh.size,
                                   flops=flops)


@functools.cache
def matmul_peak(dtype: str = "float32") -> float:
    """FLOP/s of one device on a square matmul in `dtype` (the fastest of five): the peak that MFU divides by,
    measured on the machine as nanoGPT's MFU quotes a data sheet's. 1024 x 1024 on a CPU (0.2 s), 8192 on an
    accelerator."""
    import time

    import jax.numpy as jnp

    size = 1024 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    multiply = jax.jit(lambda x, y: x @ y)
    multiply(a, a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        multiply(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def memory_available() -> tuple[int, str]:
    """Bytes one device can hold, and where the number comes from: the accelerator's own statistics, or on a CPU
    the host memory not in use (MemAvailable) shared by its devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind} memory"
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // jax.local_device_count(), "host memory available"


MAX_UPDATE_TOKENS = 2**15  # past this a micro-batch buys no speed on a CPU, only memory


def default_update_tokens(config: lm.Config, parameters: int, reference: bool, devices: int) -> tuple[int, str]:
    """The largest power of two of tokens per device whose activations (model.activation_bytes_per_token) fit in half
    of a device's free memory, after the training state (parameters, gradients and their running sum, AdamW's two
    moments, the reference when there is one) sharded over the devices and the vocabulary chunks of the log-probs."""
    available, source = memory_available()
    state = parameters * 4 * (6 if reference else 5) // devices
    vocabulary = 4 * 4 * grpo.StepConfig.chunk_size * config.vocab_size
    per_token = lm.activation_bytes_per_token(config)
    fit = max(1, (available // 2 - state - vocabulary) // per_token)
    tokens = min(MAX_UPDATE_TOKENS, 1 << (int(fit).bit_length() - 1))
    why = (f"{tokens:,} tokens per device (~{per_token / 2**20:.2f} MiB of activations a token; half of "
           f"{available / 2**30:.1f} GiB of {source}, less {state / 2**30:.1f} GiB of training state)")
    return tokens, why


def place(tree, mesh: Mesh):
    """A sharded copy of tree (never an alias: updates donate their state, which must not free the caller's arrays)."""
    shardings = state_sharding(tree, mesh)
    if jax.process_count() > 1:  # a process-local jax.Array put on a mesh over several processes comes out broken (a
        # replicated one has too many shards; JAX 0.10): those go from the host, as numpy, which every process holds
        tree = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True) else x, tree)
    return jax.device_put(tree, shardings, may_alias=False)
