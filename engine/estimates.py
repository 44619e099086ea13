"""What an update costs: its model FLOPs (MFU's numerator), the devices' measured matmul peak (its denominator), the
memory a token of a training row takes, the memory free, and the micro-batch size that fits it.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import model as lm
import multihost
from attention import ATTENTION_BLOCK


def training_flops(config: lm.Config, token_mask, scored) -> float:
    """Model FLOPs of a forward and backward pass (an update's gradient) over rows token_mask [rows, t] whose loss reads
    the tokens of the mask `scored`: nanoGPT's estimate (PaLM's appendix B), 6 N a token for the N weights of the
    matmuls it goes through and 12 L H Q T for its attention in a row of T tokens. The vocabulary projection's weights
    count for the scored tokens only, the only ones unembedded (scored_logprobs). Padding, and what remat or the
    chunked log-probs compute twice, are not model FLOPs: MFU leaves them out."""
    c = config
    lengths = np.asarray(token_mask).sum(1).astype(np.float64)
    layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    attention = 12 * c.num_layers * c.num_heads * c.head_dim
    unembedded = float((np.asarray(scored) > 0).sum())
    return float(6 * c.num_layers * layer * lengths.sum() + attention * (lengths**2).sum()
                 + 6 * c.vocab_size * c.hidden_size * unembedded)


def activation_bytes_per_token(config: lm.Config, attention_block: int = ATTENTION_BLOCK) -> int:
    """A float32 upper estimate of the memory one token of a training row costs in an update's gradient: what the
    backward pass keeps of each layer (the MLP's [intermediate] activations dominate) and a row of attention scores
    (the plain attention's, kept up to one block; the blockwise attention's transient ones). XLA's memory analysis
    on CPU, Qwen2.5-0.5B's width: about 225 KiB a layer in rows of 512 tokens (plain attention) and 127 KiB in rows
    of 2,048 (blockwise); this estimate says 252."""
    c = config
    return 4 * c.num_layers * (10 * c.hidden_size + 7 * c.intermediate_size + 3 * c.num_heads * attention_block)


def memory_gib() -> dict[str, float]:
    """Memory in GiB: the accelerator's in use now and at its peak since the process started, where the backend
    counts them; else this process's resident memory now and at its peak (Linux's VmRSS and VmHWM; elsewhere the
    peak alone, from getrusage)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return {"memory_gib": stats.get("bytes_in_use", 0) / 2**30, "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30}
    try:
        status = Path("/proc/self/status").read_text()
        field = lambda name: int(status.split(name + ":")[1].split()[0]) * 1024 / 2**30  # reported in kB
        return {"memory_gib": field("VmRSS"), "peak_memory_gib": field("VmHWM")}
    except (OSError, IndexError, ValueError):
        import resource

        return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


@functools.cache
def matmul_peak(dtype: str = "float32") -> float:
    """FLOP/s of one device on a square matmul in `dtype` (the fastest of five): the peak that MFU divides by,
    measured on the machine as nanoGPT's MFU quotes a data sheet's. 1024 x 1024 on a CPU (0.2 s), 8192 on an
    accelerator."""
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
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // jax.local_device_count(), "host memory available"


def sampling_bytes(share: int = 2) -> int:
    """The memory a batch of sampled rows may take (sampler.SamplingParams.batch_bytes): 1/share of a device's free
    memory now (half, once the training state is in place; a quarter before it is), the smallest over the
    processes, which all run one program."""
    return multihost.smallest(memory_available()[0] // share)


MAX_UPDATE_TOKENS = 2**15  # past this a micro-batch buys no speed on a CPU, only memory
CPU_BUSY_FLOPS = 2**38  # a micro-batch's gradient of ~2.7e11 FLOPs keeps a CPU's cores busy; more buys only memory


def busy_tokens(config: lm.Config) -> int:
    """On a CPU, the tokens a micro-batch needs to keep the cores busy: the power of two whose gradient's matmuls
    (6 FLOPs a weight a token, training_flops' 6 N) reach CPU_BUSY_FLOPS, between 512 and MAX_UPDATE_TOKENS. Measured
    here (2 busy cores, one GRPO update of SmolLM2-135M on 16 rows of 512 tokens, study/benchmarks/microbatch_size.py's
    work): micro-batches of 512 tokens took 111 s and peaked at 5.2 GiB, of 1,024 111 s and 6.9 GiB, of 2,048 122 s
    and 10.1 GiB. Small models keep MAX_UPDATE_TOKENS (the embedded default: its matmuls are too small to keep the
    cores busy one row at a time)."""
    c = config
    weights = c.num_layers * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                              + 3 * c.hidden_size * c.intermediate_size)
    tokens = CPU_BUSY_FLOPS // (6 * max(weights, 1))
    return min(MAX_UPDATE_TOKENS, max(512, 1 << max(0, int(tokens).bit_length() - 1)))


def default_update_tokens(config: lm.Config, parameters: int, reference: bool, devices: int,
                          chunk_size: int, frozen: int = 0) -> tuple[int, str]:
    """The largest power of two of tokens per device whose activations (activation_bytes_per_token) fit in half of a
    device's free memory, after the training state (parameters, gradients and their running sum, AdamW's two
    moments, the reference when there is one, and `frozen` parameters of other models held beside it: the LLM
    judge) sharded over the devices and the vocabulary chunks of the log-probs (chunk_size tokens a chunk: the run's
    grpo.StepConfig.chunk_size); on a CPU, no more than keep its cores busy (busy_tokens): what fits is the limit,
    not the need."""
    available, source = memory_available()
    state = (parameters * (6 if reference else 5) + frozen) * 4 // devices
    vocabulary = 4 * 4 * chunk_size * config.vocab_size
    per_token = activation_bytes_per_token(config)
    fit = max(1, (available // 2 - state - vocabulary) // per_token)
    fits = 1 << (int(fit).bit_length() - 1)
    busy = busy_tokens(config) if jax.devices()[0].platform == "cpu" else MAX_UPDATE_TOKENS
    tokens = min(busy, fits)
    why = (f"{tokens:,} tokens per device (~{per_token / 2**20:.2f} MiB of activations a token; half of "
           f"{available / 2**30:.1f} GiB of {source}, less {state / 2**30:.1f} GiB of training state"
           + (f", fits {fits:,}; {busy:,} keep the CPU busy)" if busy < min(fits, MAX_UPDATE_TOKENS) else ")"))
    return tokens, why


