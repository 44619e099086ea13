"""Time per grpo_step, and the FLOP/s it achieves against a matmul peak measured on the same machine.

    python benchmarks/grpo_step.py            # ~2 minutes on 2 CPU cores

Batch 8 x 192 tokens (64 prompt + 128 completion) on a Qwen2.5-0.5B-shaped checkpoint with 4 of its
24 layers and random weights, float32, token-mean loss with a k3 KL term. Model FLOPs per token
follow nanoGPT's estimate for a forward and backward pass, 6 N + 12 L H Q T (N the parameters used
in matmuls, output projection included; L layers, H heads, Q head dim, T sequence length); the
chunked log-prob's recomputation of the output projection is extra work not counted, as in MFU.
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import grpo
import model as lm
from timing import timed_steps

CONFIG = lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=4,
                   num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True)


def matmul_peak(size=2048, repeats=5):
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def model_flops_per_token(config, length):
    per_layer = config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads) \
        + 3 * config.hidden_size * config.intermediate_size
    matmul_params = config.num_layers * per_layer + config.vocab_size * config.hidden_size
    return 6 * matmul_params + 12 * config.num_layers * config.num_heads * config.head_dim * length


def main(batch, prompt_length, completion_length, repeats):
    length = prompt_length + completion_length
    params = lm.init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32)
    loss_mask = jnp.zeros((batch, length)).at[:, prompt_length:].set(1.0)
    logp = jnp.asarray(-rng.uniform(0, 5, (batch, length)), jnp.float32)
    data = grpo.Batch(tokens, jnp.ones((batch, length), bool), loss_mask, logp, logp - 0.01,
                      jnp.asarray(np.repeat(rng.normal(size=(batch, 1)), length, 1), jnp.float32))
    optimizer = grpo.make_optimizer(1e-6)
    step = jax.jit(functools.partial(grpo.grpo_step, model_config=CONFIG, optimizer=optimizer), donate_argnums=0)
    state = grpo.init_state(params, optimizer)

    first, seconds = timed_steps(step, state, data, repeats)
    achieved = model_flops_per_token(CONFIG, length) * batch * length / seconds
    peak = matmul_peak()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    print(f"grpo_step, {lm.count_params(params) / 1e6:.1f}M parameters, batch {batch} x {length} tokens")
    print(f"  time per step     {seconds:.2f} s (median of {repeats}); compile {first - seconds:.1f} s")
    print(f"  model FLOP/s      {achieved / 1e9:.1f} GFLOP/s")
    print(f"  matmul peak       {peak / 1e9:.1f} GFLOP/s (2048^3 float32, same run)")
    print(f"  fraction of peak  {achieved / peak:.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.batch, args.prompt_length, args.completion_length, args.repeats)
