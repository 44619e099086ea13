"""The cost of PaW's world-model loss: paw_step against grpo_step on the same batch.

    python study/benchmarks/paw_overhead.py            # ~4 minutes on 2 CPU cores

Batch 8 x 192 tokens per row: 64 prompt, 64 action and 64 observation tokens (grpo_step gets the
same tokens with the observation outside its loss mask). float32, no KL term, alpha 0.75.
The paper reports ~2% of step time. Median of 3 steps after one compiling step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import grpo
import model as lm
import paw
from timing import timed_steps

CONFIGS = {
    "tiny (2 layers, hidden 64, vocab 512)": lm.Config(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True),
    "qwen2.5-0.5b-shaped (4 layers)": lm.Config(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=4, num_heads=14,
        num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True),
}


def main():
    rows, prompt, action, observation = 8, 64, 64, 64
    length = prompt + action + observation
    rng = np.random.default_rng(0)
    for name, config in CONFIGS.items():
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (rows, length)), jnp.int32)
        action_mask = jnp.zeros((rows, length)).at[:, prompt:prompt + action].set(1.0)
        observation_mask = jnp.zeros((rows, length)).at[:, prompt + action:].set(1.0)
        old = jnp.asarray(-rng.uniform(0, 5, (rows, length)), jnp.float32) * action_mask
        advantages = jnp.asarray(np.repeat(rng.normal(size=(rows, 1)), length, 1), jnp.float32) * action_mask
        mask = jnp.ones((rows, length), bool)
        selected = jnp.asarray(paw.select_by_entropy(rng.uniform(size=rows), 0.75), jnp.float32)
        paw_batch = grpo.Batch(tokens, mask, action_mask, observation_mask, old, old, advantages,
                               jnp.full((rows,), 0.5), selected)
        grpo_batch = paw_batch._replace(observation_mask=jnp.zeros_like(observation_mask),
                                        wm_lambda=jnp.zeros((rows,)), selected=jnp.zeros((rows,)))
        optimizer = grpo.make_optimizer(1e-6)
        step = grpo.StepConfig(grpo.LossConfig(beta=0.0))
        params = lm.init_params(config, jax.random.key(0))
        bind = lambda fn: jax.jit(functools.partial(fn, model_config=config, optimizer=optimizer, step=step))
        _, grpo_seconds = timed_steps(bind(grpo.grpo_step), grpo.init_state(params, optimizer), grpo_batch)
        _, paw_seconds = timed_steps(bind(paw.paw_step), grpo.init_state(params, optimizer), paw_batch)
        print(f"{name}: grpo_step {grpo_seconds * 1e3:8.1f} ms, paw_step {paw_seconds * 1e3:8.1f} ms, "
              f"overhead {paw_seconds / grpo_seconds - 1:+.1%}")


if __name__ == "__main__":
    main()
